"""Pooled connections go back without asyncpg's reset query, so none may keep session state.

LISTEN wake-ups (outbox relay, resumer) still arrive on their own connections, and after the
relay, the resumer and a borrowed listener have run, every pooled connection is clean: not
listening, holding no advisory lock, in no transaction, with its settings untouched.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from dispatcher.credits.subscriptions import create_account
from dispatcher.db import connect, create_pool, listening
from dispatcher.events import outbox
from dispatcher.events.resumer import Resumer
from dispatcher.jobs.outcomes import Done, Outcome
from dispatcher.metrics import Metrics
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import wait_for

POOL_SIZE = 3
SESSION_STATE = """
SELECT (SELECT count(*) FROM pg_listening_channels()) AS listening,
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
         AND pid = pg_backend_pid()) AS advisory_locks,
       current_setting('application_name') AS application_name,
       current_setting('statement_timeout') AS statement_timeout
"""


class RecordingExchange:
    def __init__(self) -> None:
        self.routing_keys: list[str] = []

    async def publish(self, message: object, routing_key: str, mandatory: bool = True) -> None:
        self.routing_keys.append(routing_key)


async def assert_every_pooled_connection_clean(pool: asyncpg.Pool) -> None:
    connections = [await pool.acquire() for _ in range(POOL_SIZE)]
    try:
        for conn in connections:
            assert not conn.is_in_transaction()
            row = await conn.fetchrow(SESSION_STATE)
            assert dict(row) == {"listening": 0, "advisory_locks": 0,
                                 "application_name": "dispatcher", "statement_timeout": "0"}
    finally:
        for conn in connections:
            await pool.release(conn)


async def test_outbox_and_resumer_wake_on_notify_and_leave_pooled_connections_clean(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox, "SWEEP_SECONDS", 3600.0)  # only a NOTIFY can wake the relay
    pool = await create_pool(settings, min_size=POOL_SIZE, max_size=POOL_SIZE)

    async def listen_connect() -> asyncpg.Connection:
        return await connect(settings.database_url)
    stop = asyncio.Event()
    woken: list[str] = []

    async def send(_payload: bytes, _attempt: int) -> Outcome:
        return Done("sent")

    class RecordingResumer(Resumer):
        def wake(self, account_id: str) -> None:
            woken.append(account_id)
    try:
        await pool.execute("UPDATE outbox SET published_at = now() WHERE published_at IS NULL")
        exchange = RecordingExchange()
        relay = outbox.OutboxRelay(pool, {"events": exchange, "billing": exchange},  # type: ignore[dict-item]
                                   Metrics(CollectorRegistry()), listen_connect=listen_connect)
        resumer = RecordingResumer(pool, send, Metrics(CollectorRegistry()),
                                   listen_connect=listen_connect)
        tasks = [asyncio.create_task(relay.run(stop)), asyncio.create_task(resumer.run(stop))]
        account = f"state-{uuid.uuid4().hex[:8]}"
        await create_account(pool, account)

        async def relay_idle() -> bool:
            return await pool.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
        await wait_for(relay_idle)
        await pool.execute("INSERT INTO outbox (event_id, exchange, routing_key, body) "
                           "VALUES (gen_random_uuid(), 'events', 'status.sms.sent', $1::jsonb)",
                           json.dumps({"tag": account}))

        async def relayed() -> bool:
            return "status.sms.sent" in exchange.routing_keys
        await wait_for(relayed)
        await pool.execute("SELECT pg_notify('dispatcher_resume', $1)", account)

        async def resumer_woken() -> bool:
            return account in woken
        await wait_for(resumer_woken)
        # A resume takes and drops a session advisory lock on a pooled connection.
        assert await Resumer(pool, send, Metrics(CollectorRegistry())).resume(account) == "resumed"
        async with listening(pool, None, "state_test_channel", lambda *_: None):
            pass  # a borrowed pooled connection listens, then goes back
        stop.set()
        await asyncio.gather(*tasks)
        await assert_every_pooled_connection_clean(pool)
    finally:
        stop.set()
        await pool.close()
