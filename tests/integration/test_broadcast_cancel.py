"""A broadcast cancel stops every recipient whose provider call has not started (issue 13).

Recipients are reserved in batches ahead of their send; they then wait for their sender's
rate-limit turn and for a provider slot. A cancel must stop all of those at once (`canceled`,
credits released in its transaction) and let only the creates already in flight reach the
sandbox: with a rate-limited sender, with a slow provider, for a broadcast published over AMQP,
and for held recipients released by a resume. A real dispatcher in-process, the sandbox behind
it; the ledger audit must be clean and the balance exactly the initial one minus the sends.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import RunningDispatcher, running_dispatcher, wait_for
from tests.integration.sandbox_fixture import SandboxHandle
from tests.integration.test_broadcast_e2e import (
    SENDER,
    Client,
    account_row,
    client_for,
    recipients,
    submit,
)

pytestmark = pytest.mark.timeout(180)
IN_FLIGHT = 4  # provider calls in flight per process: all a cancel may let through


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def dispatcher_with(settings: Settings, sandbox: SandboxHandle, pool: asyncpg.Pool,
                    rate: float) -> Any:
    """A dispatcher whose sender sends ``rate`` per second through ``IN_FLIGHT`` slots."""
    return running_dispatcher(settings, sandbox, pool, sender_rate_per_second=rate,
                              max_in_flight=IN_FLIGHT, reconcile_grace_seconds=30.0)


def creates_of(d: RunningDispatcher, broadcast_id: str) -> int:
    """Creates the sandbox received for the broadcast's recipients (by callback URL)."""
    return sum(1 for c in d.sandbox.state.creates()
               if f"/twilio/status/{broadcast_id}:" in (c.status_callback or ""))


async def creates_reach(d: RunningDispatcher, count: int, timeout: float = 60) -> None:
    async def reached() -> bool:
        return d.sandbox.state.count() >= count
    await wait_for(reached, timeout=timeout, interval=0.02)


async def cancel_and_check(d: RunningDispatcher, client: Client, broadcast_id: str, *,
                           total: int, funded: int, in_flight: int = IN_FLIGHT,
                           meanwhile: Callable[[], Awaitable[None]] | None = None) -> int:
    """Cancel; check what must hold at once and once the in-flight sends settled (running
    ``meanwhile`` in between). Returns how many recipients reached the sandbox."""
    status, canceled = await client.request("POST", f"/broadcasts/{broadcast_id}/cancel")
    at_cancel = creates_of(d, broadcast_id)
    assert status == 200 and canceled["status"] == "canceled", canceled
    # At once: nothing waits any more, only calls in flight still hold credits.
    assert canceled["pending"] == canceled["held"] == 0, canceled
    assert canceled["sending"] <= in_flight, canceled
    held_back = await d.pool.fetchval(
        "SELECT count(*) FROM jobs j JOIN reservations r USING (job_id) "
        "WHERE j.broadcast_id = $1 AND j.status = 'canceled' AND r.status = 'pending'",
        broadcast_id)
    assert held_back == 0  # the canceled ones' credits are released in the cancel
    if meanwhile is not None:
        await meanwhile()

    async def settled() -> bool:
        found = await client.progress(broadcast_id)
        return bool(found["sending"] == found["sent"] == 0)
    await wait_for(settled, timeout=60, interval=0.1)
    await asyncio.sleep(1.0)  # time for a wrongful late send to show
    sent = creates_of(d, broadcast_id)
    assert sent - at_cancel <= in_flight, (sent, at_cancel)
    final = await client.progress(broadcast_id)
    assert final["delivered"] == sent and final["failed"] == 0, final
    assert final["canceled"] == total - sent, final
    assert final["credits_spent"] == sent and final["credits_reserved"] == 0, final
    canceled_ids = {r["job_id"] for r in await d.pool.fetch(
        "SELECT job_id FROM jobs WHERE broadcast_id = $1 AND status = 'canceled'", broadcast_id)}
    created_ids = {(c.status_callback or "").rsplit("/", 1)[-1]
                   for c in d.sandbox.state.creates()}
    assert canceled_ids and not canceled_ids & created_ids
    assert await account_row(d, client.account) == {
        "available": funded - sent, "reserved": 0, "paused_at": None}
    assert await run_audit(d.pool) == []
    return sent


async def test_cancel_stops_recipients_waiting_for_the_rate_limit(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool,
        session: aiohttp.ClientSession) -> None:
    async with dispatcher_with(settings, twilio_sandbox, pool, rate=10) as d:
        client = await client_for(d, session, 1_000)
        other = await client_for(d, session, 100)
        broadcast_id, _ = await submit(client, recipients(300))
        await creates_reach(d, 15)  # ~0.5 s at 10/s: the first batch's other ~85 wait a turn

        async def the_next_broadcast_goes_at_once() -> None:
            # The canceled recipients left the runner's window and gave their sender's turns
            # up at once: the next broadcast (~0.5 s at 10/s) is not behind them (~8 s).
            next_id, _ = await submit(other, recipients(5))

            async def delivered() -> bool:
                return bool((await other.progress(next_id))["delivered"] == 5)
            await wait_for(delivered, timeout=3.0, interval=0.05)
        sent = await cancel_and_check(d, client, broadcast_id, total=300, funded=1_000,
                                      meanwhile=the_next_broadcast_goes_at_once)
        assert sent < 100


async def test_cancel_stops_recipients_waiting_for_a_provider_slot(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool,
        session: aiohttp.ClientSession) -> None:
    twilio_sandbox.state.configure(latency_ms=250)  # 4 slots: ~16 creates/s
    async with dispatcher_with(settings, twilio_sandbox, pool, rate=10_000) as d:
        client = await client_for(d, session, 1_000)
        broadcast_id, _ = await submit(client, recipients(300))
        await creates_reach(d, 20)
        sent = await cancel_and_check(d, client, broadcast_id, total=300, funded=1_000)
        assert sent < 100


async def test_cancel_of_a_broadcast_published_over_amqp(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool,
        session: aiohttp.ClientSession) -> None:
    async with dispatcher_with(settings, twilio_sandbox, pool, rate=20) as d:
        client = await client_for(d, session, 1_000)
        broadcast_id = f"amqp-bc-{uuid.uuid4().hex[:12]}"
        await d.publisher.publish({
            "schema_version": 1, "id": broadcast_id, "kind": "broadcast",
            "account": client.account, "from": SENDER, "body": "Hello {name}!",
            "priority": "bulk", "recipients": recipients(300)})
        await creates_reach(d, 40)
        # The AMQP job id is the broadcast id: the same route cancels it.
        sent = await cancel_and_check(d, client, broadcast_id, total=300, funded=1_000)
        assert sent < 100


async def test_cancel_stops_held_recipients_released_by_a_resume(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool,
        session: aiohttp.ClientSession) -> None:
    # Auto-recharge on, but no billing service runs: 30 are sent, the other 170 are held.
    async with dispatcher_with(settings, twilio_sandbox, pool, rate=10) as d:
        client = await client_for(d, session, 30, enabled=True, threshold=5, amount=500)
        broadcast_id, preflight = await submit(client, recipients(200))
        assert preflight["advice"] == "ok_with_auto_recharge"

        async def paused() -> bool:
            found = await client.progress(broadcast_id)
            return bool(found["delivered"] == 30 and found["held"] == 170)
        await wait_for(paused, timeout=60, interval=0.1)
        # Credits arrive: the resumer releases 20 held recipients at a time (reserved, then
        # sent one after the other at 10/s); cancel a few sends into the first release.
        await CreditStore(d.pool).grant(client.account, 500, "purchase", f"{broadcast_id}-top")
        await creates_reach(d, 33)
        sent = await cancel_and_check(d, client, broadcast_id, total=200, funded=530,
                                      in_flight=1)
        assert sent < 50
        # More credits: the account resumes with nothing of the broadcast left to send.
        await CreditStore(d.pool).grant(client.account, 100, "purchase", f"{broadcast_id}-more")
        await asyncio.sleep(1.5)
        assert creates_of(d, broadcast_id) == sent
        assert (await client.progress(broadcast_id))["canceled"] == 200 - sent


async def test_cancel_while_paused_then_resume_sends_nothing(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool,
        session: aiohttp.ClientSession) -> None:
    async with dispatcher_with(settings, twilio_sandbox, pool, rate=10_000) as d:
        client = await client_for(d, session, 10, enabled=True, threshold=2, amount=500)
        broadcast_id, _ = await submit(client, recipients(120))

        async def paused() -> bool:
            found = await client.progress(broadcast_id)
            return bool(found["delivered"] == 10 and found["held"] == 110)
        await wait_for(paused, timeout=60, interval=0.1)
        status, canceled = await client.request("POST", f"/broadcasts/{broadcast_id}/cancel")
        assert status == 200 and canceled["canceled"] == 110 and canceled["held"] == 0
        await CreditStore(d.pool).grant(client.account, 50, "purchase", f"{broadcast_id}-top")

        async def resumed() -> bool:
            return (await account_row(d, client.account))["paused_at"] is None
        await wait_for(resumed, timeout=30, interval=0.1)
        await asyncio.sleep(0.5)
        assert d.sandbox.state.count() == 10
        assert await account_row(d, client.account) == {
            "available": 50, "reserved": 0, "paused_at": None}
        assert await run_audit(d.pool) == []
