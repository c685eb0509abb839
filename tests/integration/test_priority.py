"""Transactional work is served ahead of bulk: it overtakes a queued bulk backlog.

The assertion is about order, not time: between publishing transactional jobs and their creates
reaching the sandbox, only the bulk jobs already in flight may be sent — not the bulk jobs
prefetched into the process (FIFO inside the process would send those first) and never the
backlog still queued at the broker (one FIFO queue would send all of it first).
"""

from __future__ import annotations

import asyncio
import uuid

from dispatcher.events.topology import Names
from tests.integration.dispatcher_fixture import RunningDispatcher, wait_for

BULK = 2000
TRANSACTIONAL = 5
SANDBOX_LATENCY_MS = 200  # 20 in flight / 200 ms: the backlog drains at ~100 jobs/s


async def publish_many(d: RunningDispatcher, account: str, ids: list[str], priority: str,
                       to: str) -> None:
    for start in range(0, len(ids), 200):
        await asyncio.gather(*(d.publish_sms(job_id, account, to=to, priority=priority)
                               for job_id in ids[start:start + 200]))


async def bulk_queued(d: RunningDispatcher) -> int:
    connection = d.service.amqp
    assert connection is not None
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(Names(d.settings.amqp_prefix).work_queue("bulk"),
                                            passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def staged_count(d: RunningDispatcher) -> int:
    """Bulk jobs staged in PostgreSQL behind their account's backlog (fair share)."""
    return int(await d.pool.fetchval("SELECT count(*) FROM staged_jobs"))


async def test_transactional_jobs_overtake_a_queued_bulk_backlog(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    s = d.settings
    d.sandbox.state.configure(latency_ms=SANDBOX_LATENCY_MS, callbacks_enabled=False)
    tag = uuid.uuid4().hex[:8]
    bulk_account = await d.funded_account(f"bulk-{tag}", BULK)
    tx_account = await d.funded_account(f"tx-{tag}", TRANSACTIONAL)
    bulk_to, tx_to = "+14155550171", "+14155550172"
    await publish_many(d, bulk_account, [f"b-{tag}-{i:05d}" for i in range(BULK)], "bulk",
                       bulk_to)
    # Waiting at the broker, or staged in PostgreSQL behind its account's share (fairness).
    queued = await bulk_queued(d) + await staged_count(d)
    assert queued >= BULK // 2, f"the backlog should still be queued, {queued} left"

    records_before = len(d.sandbox.state.records)
    await publish_many(d, tx_account, [f"t-{tag}-{i}" for i in range(TRANSACTIONAL)],
                       "transactional", tx_to)

    async def transactional_sent() -> bool:
        return d.sandbox.state.count(to=tx_to) == TRANSACTIONAL
    await wait_for(transactional_sent, timeout=30)

    since = d.sandbox.state.records[records_before:]
    last_tx = max(i for i, r in enumerate(since) if r.to == tx_to)
    bulk_meanwhile = sum(1 for r in since[:last_tx] if r.to == bulk_to)
    # In flight when the transactional jobs arrived, plus a little slack; FIFO inside the
    # process would add every prefetched bulk job (prefetch - in flight) on top.
    allowed = s.max_in_flight + (s.prefetch - s.max_in_flight) // 2
    assert s.prefetch - s.max_in_flight >= 20, "the fixture must prefetch beyond its workers"
    print(f"bulk sent before the last transactional job: {bulk_meanwhile} (allowed {allowed})")
    assert bulk_meanwhile <= allowed, (
        f"{bulk_meanwhile} bulk jobs were sent before the last transactional one")
    assert await bulk_queued(d) + await staged_count(d) > 0, "the bulk backlog was drained first"
