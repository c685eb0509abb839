"""PostgreSQL fails over to its synchronous standby while jobs flow: nothing committed is lost.

Two replicas on the 3-node broker cluster and a primary + synchronous standby, reached through
one multi-host DSN (``target_session_attrs=read-write``). Once a third of the jobs are sent the
primary is crashed (``pg_ctl stop -m immediate``) and the standby promoted; the replicas are
not restarted. After the run quiesces, what the sandbox accepted is compared with the ledger
on the promoted node: every accepted create has its ``sent`` job and its captured charge, no
job was created twice, and every invariant of ``tests.faults.invariants`` holds.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from tests.cluster.flow import (
    SentMeter,
    drop_sink,
    fund,
    jobs_for,
    open_billing_sink,
    open_stack,
    publish,
    quiescent,
    verify,
)
from tests.cluster.nodes import RabbitCluster, ReplicatedPostgres
from tests.faults.invariants import SENT, creates_per_job
from tests.integration.dispatcher_fixture import wait_for
from tests.integration.sandbox_fixture import SandboxHandle

ACCOUNTS = 10
JOBS_EACH = 40


@pytest.mark.timeout(240)
async def test_a_failover_while_jobs_flow_loses_no_committed_send_or_charge(
        rabbit_cluster: RabbitCluster, replicated_postgres: ReplicatedPostgres,
        twilio_sandbox: SandboxHandle, tmp_path: Path) -> None:
    twilio_sandbox.state.configure(latency_ms=20)
    pg = replicated_postgres
    dsn = await asyncio.to_thread(pg.create_database, "dispatcher")
    stack = await open_stack(dsn, rabbit_cluster, twilio_sandbox, tmp_path, replicas=2)
    accounts, _ = await fund(stack.pool, stack.prefix, ACCOUNTS, JOBS_EACH, dry=0)
    sink_connection, sink = await open_billing_sink(rabbit_cluster.urls, stack.prefix)
    meter = SentMeter(stack.pool, accounts)
    jobs = jobs_for(accounts, JOBS_EACH, random.Random(18))
    try:
        await asyncio.to_thread(stack.start_all)
        meter.start()
        started = time.monotonic()
        publishing = asyncio.create_task(publish(rabbit_cluster.urls, stack.prefix, jobs))
        await meter.wait_sent(len(jobs) // 3)
        crash = time.monotonic()
        failover_seconds = await asyncio.to_thread(pg.fail_over)
        await publishing

        async def settled() -> bool:
            return await quiescent(stack.pool, accounts, len(jobs))
        await wait_for(settled, timeout=120, interval=0.5)
        violations = await verify(stack, twilio_sandbox, accounts, sink)
        # What the provider accepted is exactly what the promoted ledger says was sent+charged.
        creates = creates_per_job(twilio_sandbox, stack.base_urls)
        rows = await stack.pool.fetch(
            "SELECT j.job_id, j.status, r.status AS reservation, r.captured"
            "  FROM jobs j LEFT JOIN reservations r USING (job_id)"
            " WHERE j.job_id = ANY($1::text[])", list(creates))
        ledger = {r["job_id"]: r for r in rows}
        violations += [f"job {job}: accepted by the provider, not in the promoted ledger"
                       for job in creates if job not in ledger]
        violations += [f"job {r['job_id']}: accepted, yet {r['status']} / reservation "
                       f"{r['reservation']} captured {r['captured']}" for r in rows
                       if r["status"] not in SENT or r["reservation"] != "captured"
                       or r["captured"] != 1]
        assert len(creates) == len(jobs)
        assert violations == [], violations[:20]
        for replica in stack.replicas:  # rode it out: never restarted
            assert replica.proc is not None and replica.proc.poll() is None
        assert any("database_server_changed" in log for log in stack.logs())
        back = meter.first_progress_after(crash)
        print(f"\nfailover: {len(jobs)} jobs, promote took {failover_seconds:.2f} s, sending "
              f"again {back - crash if back else float('nan'):.2f} s after the crash; "
              f"{meter.rate(started, crash):.0f} jobs/s before, "
              f"{meter.rate(back or crash, meter.last_send()):.0f} after")
    finally:
        await meter.stop()
        stack.stop_all()
        await drop_sink(sink_connection, sink)
        await stack.pool.close()
