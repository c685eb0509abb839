"""A RabbitMQ node killed with -9 while jobs flow, then brought back: nothing lost or doubled.

Two replicas list the 3 nodes from different ones; the quorum queues are declared with
``x-quorum-initial-group-size`` 3, so each has a member on every node. The node the first
replica, the publisher and the queue leaders use is killed once a third of the jobs are sent:
clients reconnect to another node, the queues elect a leader among the two left, publishes that
died unconfirmed are published again (same job id), and the node rejoins after its restart.
"""

from __future__ import annotations

import asyncio
import json
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
from tests.integration.dispatcher_fixture import wait_for
from tests.integration.sandbox_fixture import SandboxHandle

ACCOUNTS = 10
JOBS_EACH = 40
DOWN_SECONDS = 2.0


def members(mq: RabbitCluster, queue: str) -> int:
    """How many nodes hold a replica of the quorum queue ``queue``."""
    out = mq.ctl(mq.nodes[1], "list_queues", "-q", "--formatter", "json", "name", "members")
    return next(len(q["members"]) for q in json.loads(out) if q["name"] == queue)


@pytest.mark.timeout(240)
async def test_b_broker_node_kill_9_and_back_while_jobs_flow(
        rabbit_cluster: RabbitCluster, replicated_postgres: ReplicatedPostgres,
        twilio_sandbox: SandboxHandle, tmp_path: Path) -> None:
    twilio_sandbox.state.configure(latency_ms=20)
    mq = rabbit_cluster
    dsn = await asyncio.to_thread(replicated_postgres.create_database, "dispatcher")
    stack = await open_stack(dsn, mq, twilio_sandbox, tmp_path, replicas=2)
    accounts, _ = await fund(stack.pool, stack.prefix, ACCOUNTS, JOBS_EACH, dry=0)
    sink_connection, sink = await open_billing_sink(mq.urls, stack.prefix)
    meter = SentMeter(stack.pool, accounts)
    jobs = jobs_for(accounts, JOBS_EACH, random.Random(5))
    victim = mq.nodes[0]
    restart: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(stack.start_all)
        assert await asyncio.to_thread(members, mq, f"{stack.prefix}.bulk") == 3
        meter.start()
        started = time.monotonic()
        publishing = asyncio.create_task(publish(mq.urls, stack.prefix, jobs, per_second=150))
        await meter.wait_sent(len(jobs) // 3)
        killed = time.monotonic()
        await asyncio.to_thread(victim.kill9)
        await asyncio.sleep(DOWN_SECONDS)
        restart = asyncio.create_task(asyncio.to_thread(victim.start))
        retried = await publishing

        async def settled() -> bool:
            return await quiescent(stack.pool, accounts, len(jobs))
        await wait_for(settled, timeout=120, interval=0.5)
        await restart
        violations = await verify(stack, twilio_sandbox, accounts, sink)
        assert violations == [], violations[:20]
        for replica in stack.replicas:
            assert replica.proc is not None and replica.proc.poll() is None
        first = next(stack.logs())
        assert '"amqp_reconnected"' in first, "replica 0 reconnected to another node"
        assert await asyncio.to_thread(mq.running_nodes) == 3
        back = meter.first_progress_after(killed)
        print(f"\nbroker node kill: {len(jobs)} jobs, {retried} publishes retried, sending "
              f"again {back - killed if back else float('nan'):.2f} s after the kill; "
              f"{meter.rate(started, killed):.0f} jobs/s before, "
              f"{meter.rate(back or killed, meter.last_send()):.0f} after")
    finally:
        if restart is not None:  # the cluster is the next test's too: whole again
            await asyncio.gather(restart, return_exceptions=True)
        if not victim.running:
            await asyncio.to_thread(victim.start)
        await meter.stop()
        stack.stop_all()
        await drop_sink(sink_connection, sink)
        await stack.pool.close()
