"""The chaos run: a broker node, a replica and the primary database lost while jobs flow.

3 RabbitMQ nodes, a PostgreSQL primary with a synchronous standby, the Twilio sandbox and 3
dispatcher replicas. Two thousand jobs over 50 accounts (ten run out of credit halfway and are
topped up mid-run) are published while, one after the other: a broker node is killed with -9
and brought back, a replica is killed with -9 (and restarted, as its supervisor would), and the
database fails over to the standby. After it quiesces, every invariant of
``tests.faults.invariants`` holds over the three replicas: every job terminal (or held for want
of credit), no create twice at the sandbox, every charge matching a send, the ledger audit
clean, every low-balance crossing relayed to billing exactly once. The figures are printed.

``CHAOS_SEED=<seed>`` replays a run's job order and timings.
"""

from __future__ import annotations

import asyncio
import os
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
    top_up,
    verify,
)
from tests.cluster.nodes import RabbitCluster, ReplicatedPostgres
from tests.integration.dispatcher_fixture import wait_for
from tests.integration.sandbox_fixture import SandboxHandle

ACCOUNTS = 50
JOBS_EACH = 40
DRY = 10  # accounts that can pay for half their jobs until topped up
REPLICAS = 3


def seed() -> int:
    return int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))


@pytest.mark.timeout(300)
async def test_c_chaos_broker_node_replica_and_database_lost_nothing_lost_or_doubled(
        rabbit_cluster: RabbitCluster, replicated_postgres: ReplicatedPostgres,
        twilio_sandbox: SandboxHandle, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_seed = seed()
    rng = random.Random(run_seed)
    twilio_sandbox.state.configure(latency_ms=20)
    mq, pg = rabbit_cluster, replicated_postgres
    dsn = await asyncio.to_thread(pg.create_database, "dispatcher")
    stack = await open_stack(dsn, mq, twilio_sandbox, tmp_path, replicas=REPLICAS)
    accounts, dry = await fund(stack.pool, stack.prefix, ACCOUNTS, JOBS_EACH, dry=DRY)
    sink_connection, sink = await open_billing_sink(mq.urls, stack.prefix)
    meter = SentMeter(stack.pool, accounts)
    jobs = jobs_for(accounts, JOBS_EACH, rng)
    node = mq.nodes[rng.randrange(len(mq.nodes))]
    replica = stack.replicas[rng.randrange(REPLICAS)]
    background: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(stack.start_all)
        meter.start()
        started = time.monotonic()
        publishing = asyncio.create_task(publish(mq.urls, stack.prefix, jobs))

        await meter.wait_sent(len(jobs) // 5, timeout=120)
        first_kill = time.monotonic()
        await asyncio.to_thread(node.kill9)
        stack.kills.append(f"broker node {node.name}")
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        background.append(asyncio.create_task(asyncio.to_thread(node.start)))

        await meter.wait_sent(2 * len(jobs) // 5, timeout=120)
        await asyncio.to_thread(replica.kill9)
        stack.kills.append(f"replica {stack.replicas.index(replica)}")
        await top_up(stack.pool, dry, JOBS_EACH)  # the dry accounts' credits arrive meanwhile
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        background.append(asyncio.create_task(asyncio.to_thread(replica.start)))

        await meter.wait_sent(3 * len(jobs) // 5, timeout=120)
        crash = time.monotonic()
        failover_seconds = await asyncio.to_thread(pg.fail_over)
        stack.kills.append("database primary")
        retried = await publishing
        for task in background:
            await task

        async def settled() -> bool:
            return await quiescent(stack.pool, accounts, len(jobs))
        await wait_for(settled, timeout=150, interval=0.5)
        done = time.monotonic()
        violations = await verify(stack, twilio_sandbox, accounts, sink)
        assert violations == [], (f"CHAOS_SEED={run_seed}: {len(violations)} violations: "
                                  f"{violations[:20]}")
        held = await stack.pool.fetchval(
            "SELECT count(*) FROM jobs WHERE account_id = ANY($1::text[]) AND status = 'held'",
            accounts)
        assert held == 0, "every dry account was topped up enough for all its jobs"
        assert await asyncio.to_thread(mq.running_nodes) == 3
        back = meter.first_progress_after(crash + failover_seconds) or crash
        with capsys.disabled():
            print(f"\nchaos (CHAOS_SEED={run_seed}): {len(jobs)} jobs over {ACCOUNTS} accounts "
                  f"on {REPLICAS} replicas, {len(stack.kills)} kills ({', '.join(stack.kills)}), "
                  f"{retried} publishes retried; database failover {failover_seconds:.2f} s "
                  f"(sending again {back - crash:.2f} s after the crash); "
                  f"{meter.rate(started, first_kill):.0f} jobs/s before the first kill, "
                  f"{meter.rate(back, meter.last_send()):.0f} after the failover; "
                  f"{done - started:.0f} s in all")
    finally:
        for task in background:
            await asyncio.gather(task, return_exceptions=True)
        if not node.running:
            await asyncio.to_thread(node.start)
        await meter.stop()
        stack.stop_all()
        await drop_sink(sink_connection, sink)
        await stack.pool.close()
