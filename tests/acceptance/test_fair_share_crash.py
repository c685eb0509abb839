"""kill -9 while a backlog is staged in PostgreSQL: another dispatcher sends each job once.

The staged deliveries (some claimed by the killed process, most not) are durable rows; the new
process finds them by its scan, takes the dead process's claims back once their lease lapses,
and every job ends delivered, sent once, with the ledger audit clean.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.settings import Settings
from tests.acceptance.process import DispatcherProcess
from tests.acceptance.test_crash_recovery import count, publish_jobs, sends_per_job
from tests.integration.dispatcher_fixture import dispatcher_settings, drop_topology, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

JOBS = 1500


async def test_kill_9_with_a_staged_backlog_then_another_process_sends_each_once(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool,
        tmp_path: Path) -> None:
    s = dispatcher_settings(settings, twilio_sandbox, log_format="json",
                            reconcile_grace_seconds=2.0, max_in_flight=20, prefetch=50,
                            fair_share=20, staging_lease_seconds=2.0, staging_scan_seconds=0.5)
    twilio_sandbox.state.configure(latency_ms=100)  # 20 in flight: ~200 jobs/s
    account = f"fair-crash-{uuid.uuid4().hex[:8]}"
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 10 * JOBS, "purchase", f"{account}-seed")
    first = DispatcherProcess(s, tmp_path / "first.log")
    second = DispatcherProcess(s, tmp_path / "second.log")
    try:
        first.start()
        ids = await publish_jobs(s, account, JOBS)

        async def staged_and_sending() -> bool:
            return (await count(pool, "SELECT count(*) FROM staged_jobs") >= JOBS // 3
                    and await count(pool, "SELECT count(*) FROM staged_jobs "
                                          "WHERE claimed_by IS NOT NULL") > 0
                    and await count(pool, "SELECT count(*) FROM jobs") > 0)
        await wait_for(staged_and_sending, timeout=60)
        first.kill9()
        staged = await count(pool, "SELECT count(*) FROM staged_jobs")

        second.start()

        async def all_delivered() -> bool:
            return await count(pool, "SELECT count(*) FROM jobs WHERE account_id = $1 "
                                     "AND status = 'delivered'", account) == JOBS
        await wait_for(all_delivered, timeout=120, interval=0.5)
        await twilio_sandbox.wait_callbacks()
        duplicates = {j: n for j, n in sends_per_job(twilio_sandbox, s, ids).items() if n != 1}
        assert duplicates == {}, f"sent other than once: {list(duplicates.items())[:5]}"
        assert await count(pool, "SELECT count(*) FROM staged_jobs") == 0
        assert await run_audit(pool) == []
        balance = await CreditStore(pool).balance(account)
        assert (balance.available, balance.reserved) == (9 * JOBS, 0)
        print(f"staged when killed: {staged}")
    finally:
        first.stop_quietly()
        second.stop_quietly()
        await drop_topology(s)
