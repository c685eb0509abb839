"""RabbitMQ killed with -9 under load, down for 10 s or 45 s, then restarted (a private node).

Jobs are in flight when the broker dies: their provider calls finish, their acks go to a dead
channel, and the broker redelivers them after the restart. Nothing may be sent twice for that,
nothing lost, and status events written meanwhile are relayed once the broker is back. The run
ends with every invariant of ``tests.faults.invariants`` and a few more jobs flowing.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.settings import Settings
from tests.acceptance.process import DispatcherProcess
from tests.faults.invariants import SENT, check_all
from tests.faults.nodes import PrivateRabbitMQ
from tests.faults.test_outages import publish_steadily, readyz
from tests.integration.dispatcher_fixture import dispatcher_settings, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

JOBS, AFTER = 300, 20


async def sent(pool: asyncpg.Pool, account: str) -> int:
    return int(await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE account_id = $1 AND status = ANY($2::text[])",
        account, list(SENT)))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("outage_seconds", [10.0, 45.0])
async def test_a_broker_outage_under_load_loses_nothing_and_sends_nothing_twice(
        database_url: str, pool: asyncpg.Pool, twilio_sandbox: SandboxHandle, tmp_path: Path,
        private_rabbitmq: PrivateRabbitMQ, outage_seconds: float) -> None:
    rabbit = private_rabbitmq
    s = dispatcher_settings(
        replace(Settings(), database_url=database_url, amqp_url=rabbit.url,
                amqp_prefix=f"fault{uuid.uuid4().hex[:8]}", log_format="json"),
        twilio_sandbox, max_in_flight=10, prefetch=50, reconcile_grace_seconds=3.0)
    twilio_sandbox.state.configure(latency_ms=200)  # ~50 jobs/s: the kill lands mid-stream
    account = f"broker-{uuid.uuid4().hex[:6]}"
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 10 * JOBS, "purchase", f"{account}-seed")
    process = DispatcherProcess(s, tmp_path / "dispatcher.log")
    try:
        process.start()
        ids = [f"{account}-{i:04d}" for i in range(JOBS)]
        await publish_steadily(s, account, ids, 0.0)  # confirmed: safe in the quorum queue

        async def some_sent() -> bool:
            return await sent(pool, account) >= 60
        await wait_for(some_sent, timeout=60, interval=0.1)
        await asyncio.to_thread(rabbit.kill9)
        await asyncio.sleep(outage_seconds)
        assert process.proc is not None and process.proc.poll() is None, "the service died"
        assert (await readyz(s))[0] == 503
        await asyncio.to_thread(rabbit.start)

        async def ready_again() -> bool:
            return (await readyz(s))[0] == 200
        await wait_for(ready_again, timeout=90, interval=0.5)
        later = [f"{account}-after-{i}" for i in range(AFTER)]
        await publish_steadily(s, account, later, 0.0)

        async def all_sent() -> bool:
            return await sent(pool, account) == JOBS + AFTER
        await wait_for(all_sent, timeout=120, interval=0.5)

        async def outbox_empty() -> bool:
            return await pool.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
        await wait_for(outbox_empty, timeout=60, interval=0.5)
        await twilio_sandbox.wait_callbacks()
        violations = await check_all(pool, twilio_sandbox, s.public_base_url, [account],
                                     ids + later)
        assert violations == []
        assert await asyncio.to_thread(process.terminate) == 0
    finally:
        process.stop_quietly()
