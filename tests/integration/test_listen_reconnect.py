"""A LISTEN connection that dies is noticed and re-established, and what was missed is covered.

The listening backend is killed with ``pg_terminate_backend`` while the dispatcher runs; new
listening connections wait behind a gate the test opens, so "while nobody listens" is a state
the test controls rather than a race. Without the reconnect, nothing would listen again: held
jobs would stay held and the outbox would wait for its (here hour-long) sweep.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from dispatcher import service
from dispatcher.credits.ledger import CreditStore
from dispatcher.db import LISTEN_APPLICATION_PREFIX
from dispatcher.events import outbox
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import RunningDispatcher, running_dispatcher, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

LISTENERS = """
SELECT pid FROM pg_stat_activity
 WHERE datname = current_database() AND application_name = $1
"""


class ListenGate:
    """Wraps the service's connect so new LISTEN connections wait until the gate is open."""

    def __init__(self, connect: Callable[[str], Awaitable[asyncpg.Connection]]) -> None:
        self._connect = connect
        self.open = asyncio.Event()
        self.open.set()

    async def __call__(self, dsn: str) -> asyncpg.Connection:
        await self.open.wait()
        return await self._connect(dsn)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> ListenGate:
    listen_gate = ListenGate(service.connect)
    monkeypatch.setattr(service, "connect", listen_gate)
    return listen_gate


@pytest_asyncio.fixture
async def quiet_dispatcher(settings: Settings, twilio_sandbox: SandboxHandle,
                           pool: asyncpg.Pool, gate: ListenGate,
                           monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningDispatcher]:
    """A dispatcher whose sweeps are an hour apart: only a NOTIFY or a reconnect can wake it."""
    monkeypatch.setattr(outbox, "SWEEP_SECONDS", 3600.0)
    async with running_dispatcher(settings, twilio_sandbox, pool,
                                  resume_sweep_interval_seconds=3600.0) as d:
        yield d


async def listener_pids(pool: asyncpg.Pool, channel: str) -> list[int]:
    return [r["pid"] for r in await pool.fetch(LISTENERS, LISTEN_APPLICATION_PREFIX + channel)]


async def kill_listener(pool: asyncpg.Pool, channel: str) -> int:
    """Terminate the backend listening on ``channel`` once it is up; returns its pid."""
    async def listening() -> bool:
        return len(await listener_pids(pool, channel)) == 1
    await wait_for(listening)
    [pid] = await listener_pids(pool, channel)
    assert await pool.fetchval("SELECT pg_terminate_backend($1)", pid)

    async def gone() -> bool:
        return pid not in await listener_pids(pool, channel)
    await wait_for(gone)
    return pid


async def listening_again(pool: asyncpg.Pool, channel: str, killed: int) -> None:
    async def back() -> bool:
        pids = await listener_pids(pool, channel)
        return len(pids) == 1 and pids[0] != killed
    await wait_for(back)


def reconnects(d: RunningDispatcher, listener: str) -> float:
    value = d.service.metrics.registry.get_sample_value(
        "dispatcher_listen_reconnects_total", {"listener": listener})
    assert value is not None
    return value


async def held_account(d: RunningDispatcher, jobs: int) -> tuple[str, list[str]]:
    account = await d.funded_account(f"listen-{uuid.uuid4().hex[:10]}", 0)
    ids = [f"{account}-{i}" for i in range(jobs)]
    for job_id in ids:
        await d.publish_sms(job_id, account)

    async def all_held() -> bool:
        rows = await d.pool.fetch("SELECT status FROM jobs WHERE account_id = $1", account)
        return len(rows) == jobs and {r["status"] for r in rows} == {"held"}
    await wait_for(all_held)
    return account, ids


async def delivered(d: RunningDispatcher, ids: list[str]) -> None:
    async def all_delivered() -> bool:
        rows = await d.pool.fetch("SELECT status FROM jobs WHERE job_id = ANY($1::text[])", ids)
        return len(rows) == len(ids) and {r["status"] for r in rows} == {"delivered"}
    await wait_for(all_delivered)


async def test_resumer_listens_again_after_its_backend_is_terminated(
        quiet_dispatcher: RunningDispatcher) -> None:
    d = quiet_dispatcher
    account, ids = await held_account(d, 3)
    killed = await kill_listener(d.pool, "dispatcher_resume")
    await listening_again(d.pool, "dispatcher_resume", killed)

    await CreditStore(d.pool).grant(account, 3, "purchase", f"{account}-pay")
    await delivered(d, ids)
    assert reconnects(d, "resumer") == 1


async def test_credits_granted_while_nobody_listens_resume_the_account_on_reconnect(
        quiet_dispatcher: RunningDispatcher, gate: ListenGate) -> None:
    d = quiet_dispatcher
    account, ids = await held_account(d, 3)
    gate.open.clear()
    killed = await kill_listener(d.pool, "dispatcher_resume")
    # Its NOTIFY reaches nobody: only the pass after the reconnect can find the credits.
    await CreditStore(d.pool).grant(account, 3, "purchase", f"{account}-pay")
    assert await listener_pids(d.pool, "dispatcher_resume") == []
    gate.open.set()

    await listening_again(d.pool, "dispatcher_resume", killed)
    await delivered(d, ids)


async def test_resume_sweep_finds_credits_whose_notify_was_missed(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool,
        gate: ListenGate) -> None:
    async with running_dispatcher(settings, twilio_sandbox, pool,
                                  resume_sweep_interval_seconds=0.5) as d:
        account, ids = await held_account(d, 2)
        gate.open.clear()  # the listener never comes back: only the sweep is left
        await kill_listener(d.pool, "dispatcher_resume")
        await CreditStore(d.pool).grant(account, 2, "purchase", f"{account}-pay")
        await delivered(d, ids)
        assert await listener_pids(d.pool, "dispatcher_resume") == []
        gate.open.set()


async def test_outbox_event_written_while_nobody_listens_is_relayed_on_reconnect(
        quiet_dispatcher: RunningDispatcher, gate: ListenGate) -> None:
    d = quiet_dispatcher
    gate.open.clear()
    killed = await kill_listener(d.pool, "dispatcher_outbox")
    event_id = await write_event(d.pool, {"tag": "while-down"})
    assert await listener_pids(d.pool, "dispatcher_outbox") == []
    gate.open.set()

    await listening_again(d.pool, "dispatcher_outbox", killed)
    await published(d.pool, event_id)
    # And the new LISTEN works: an event written now is relayed by its NOTIFY alone.
    await published(d.pool, await write_event(d.pool, {"tag": "after"}))
    assert reconnects(d, "outbox") == 1


async def write_event(pool: asyncpg.Pool, body: dict[str, Any]) -> uuid.UUID:
    event_id = uuid.uuid4()
    await pool.execute("INSERT INTO outbox (event_id, exchange, routing_key, body) "
                       "VALUES ($1, 'events', 'status.sms.sent', $2::jsonb)",
                       event_id, json.dumps(body))
    return event_id


async def published(pool: asyncpg.Pool, event_id: uuid.UUID) -> None:
    async def relayed() -> bool:
        return bool(await pool.fetchval(
            "SELECT published_at IS NOT NULL FROM outbox WHERE event_id = $1", event_id))
    await wait_for(relayed)
