"""kill -9 in the middle of 2,000 jobs, restart: every job terminal, none sent twice, audit clean.

Also SIGTERM: the shutdown leaves no job `sending`/`unknown`, and a restart finishes the rest.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.events.publisher import JobPublisher
from dispatcher.events.topology import Names
from dispatcher.settings import Settings
from tests.acceptance.process import DispatcherProcess
from tests.integration.dispatcher_fixture import dispatcher_settings, drop_topology, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

JOBS = 2000


async def count(pool: asyncpg.Pool, sql: str, *args: object) -> int:
    return int(await pool.fetchval(sql, *args))


async def publish_jobs(s: Settings, account: str, n: int) -> list[str]:
    ids = [f"{account}-j{i:05d}" for i in range(n)]
    async with await JobPublisher.connect(s.amqp_url, Names(s.amqp_prefix).jobs_exchange) as pub:
        for i, job_id in enumerate(ids):
            await pub.publish({"schema_version": 1, "id": job_id, "kind": "sms",
                               "account": account, "to": f"+1415555{i % 10000:04d}",
                               "from": "+14155550199", "body": f"crash test {i}",
                               "priority": "bulk"})
    return ids


def sends_per_job(sandbox: SandboxHandle, s: Settings, ids: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(ids, 0)
    prefix = f"{s.public_base_url}/twilio/status/"
    for record in sandbox.state.creates(accepted=True):
        if record.status_callback and record.status_callback.startswith(prefix):
            counts[record.status_callback.removeprefix(prefix)] += 1
    return counts


@pytest.fixture
async def crash_setup(settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool,
                      tmp_path: Path):  # type: ignore[no-untyped-def]
    s = dispatcher_settings(settings, twilio_sandbox, log_format="json",
                            reconcile_grace_seconds=2.0, max_in_flight=50, prefetch=100)
    account = f"crash-{uuid.uuid4().hex[:8]}"
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 10 * JOBS, "purchase", f"{account}-seed")
    process = DispatcherProcess(s, tmp_path / "dispatcher.log")
    yield s, account, process
    process.stop_quietly()
    await drop_topology(s)


async def test_kill_9_mid_stream_then_restart_sends_everything_exactly_once(
        crash_setup, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:  # type: ignore[no-untyped-def]
    s, account, process = crash_setup
    process.start()
    ids = await publish_jobs(s, account, JOBS)

    async def some_sent() -> bool:
        return await count(pool, "SELECT count(*) FROM jobs WHERE account_id = $1 "
                                 "AND status IN ('sent', 'delivered')", account) >= JOBS // 4
    await wait_for(some_sent, timeout=60)
    process.kill9()
    in_flight = await count(pool, "SELECT count(*) FROM jobs WHERE account_id = $1 "
                                  "AND status = 'sending'", account)

    process.start()

    async def all_delivered() -> bool:
        return await count(pool, "SELECT count(*) FROM jobs WHERE account_id = $1 "
                                 "AND status = 'delivered'", account) == JOBS
    await wait_for(all_delivered, timeout=120, interval=0.5)
    await twilio_sandbox.wait_callbacks()
    duplicates = {j: n for j, n in sends_per_job(twilio_sandbox, s, ids).items() if n != 1}
    assert duplicates == {}, f"sent other than once: {list(duplicates.items())[:5]}"
    assert await run_audit(pool) == []
    balance = await CreditStore(pool).balance(account)
    assert (balance.available, balance.reserved) == (9 * JOBS, 0)
    print(f"jobs caught in 'sending' by the kill: {in_flight}")


async def test_sigterm_drains_in_flight_jobs_and_a_restart_finishes_the_rest(
        crash_setup, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:  # type: ignore[no-untyped-def]
    s, account, process = crash_setup
    # Slow enough creates that the 600 jobs (one account, begun in shared batches) cannot all
    # be through before the SIGTERM: 50 in flight / 0.5 s is 100 jobs/s.
    twilio_sandbox.state.configure(latency_ms=500)
    process.start()
    ids = await publish_jobs(s, account, 600)

    async def some_sent() -> bool:
        return await count(pool, "SELECT count(*) FROM jobs WHERE account_id = $1 "
                                 "AND status IN ('sent', 'delivered')", account) >= 100
    await wait_for(some_sent, timeout=60)
    assert await asyncio.to_thread(process.terminate) == 0
    stuck = await count(pool, "SELECT count(*) FROM jobs WHERE account_id = $1 "
                              "AND status IN ('sending', 'unknown')", account)
    assert stuck == 0
    unfinished = await count(pool, "SELECT count(*) FROM jobs WHERE account_id = $1", account)
    assert unfinished < 600, "shutdown should have stopped before the end of the stream"

    process.start()

    async def all_delivered() -> bool:
        return await count(pool, "SELECT count(*) FROM jobs WHERE account_id = $1 "
                                 "AND status = 'delivered'", account) == 600
    await wait_for(all_delivered, timeout=120, interval=0.5)
    await twilio_sandbox.wait_callbacks()
    assert all(n == 1 for n in sends_per_job(twilio_sandbox, s, ids).values())
    assert await run_audit(pool) == []
