"""Broadcast recipients' end-to-end latency: their own series, measured from the submission."""

from __future__ import annotations

import json
import uuid

from dispatcher.broadcasts.preflight import Recipients
from dispatcher.broadcasts.runner import Broadcasts, BroadcastSpec, store_broadcast
from dispatcher.credits.rates import RateCache
from dispatcher.metrics import END_TO_END_BUCKETS, Metrics
from tests.integration.dispatcher_fixture import RunningDispatcher, wait_for
from tests.integration.test_api_broadcasts import numbers_of

PEOPLE = 5


def end_to_end(metrics: Metrics, kind: str, suffix: str = "count", **labels: str) -> float:
    value = metrics.registry.get_sample_value(
        f"dispatcher_end_to_end_seconds_{suffix}", {"kind": kind, **labels})
    assert value is not None
    return value


async def test_recipients_observe_end_to_end_from_the_broadcasts_submission(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(f"acct-{uuid.uuid4().hex[:8]}", 100)
    spec = BroadcastSpec(account, "Sale today", False, "bulk", "+14155550199", None,
                         Recipients.from_dicts([{"to": n} for n in numbers_of("US", PEOPLE)]))
    broadcasts = Broadcasts(d.pool, RateCache(d.pool))
    result = await broadcasts.check(spec, refuse_if_short=True)
    broadcast_id = f"bc-{uuid.uuid4().hex[:8]}"
    async with d.pool.acquire() as conn, conn.transaction():
        assert await store_broadcast(conn, broadcast_id, spec, result)
        # Submitted two hours ago, as the runner first sees it (it polls for running ones).
        await conn.execute("UPDATE broadcasts SET created_at = now() - interval '2 hours' "
                           "WHERE id = $1", broadcast_id)
    metrics = d.service.metrics

    async def all_observed() -> bool:
        return end_to_end(metrics, "broadcast") == PEOPLE
    await wait_for(all_observed)
    assert end_to_end(metrics, "sms") == 0  # single jobs' latency is not mixed with fan-outs'
    # From the submission, not from when the recipient's job was created: all over an hour.
    hour = next(b for b in END_TO_END_BUCKETS if b >= 3600)
    assert end_to_end(metrics, "broadcast", "bucket", le=str(hour)) == 0
    submitted = await d.pool.fetchval("SELECT created_at FROM broadcasts WHERE id = $1",
                                      broadcast_id)
    payloads = await d.pool.fetch("SELECT payload FROM jobs WHERE broadcast_id = $1",
                                  broadcast_id)
    assert {json.loads(p["payload"])["created_at"] for p in payloads} == {submitted.isoformat()}


async def test_single_sms_jobs_keep_their_own_kind(dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(f"acct-{uuid.uuid4().hex[:8]}", 10)
    # A single job may carry a broadcast_id of its own in metadata: it is still an sms.
    await d.publish_sms(f"one-{uuid.uuid4().hex[:8]}", account,
                        metadata={"broadcast_id": "not-mine"})
    metrics = d.service.metrics

    async def observed() -> bool:
        return end_to_end(metrics, "sms") == 1
    await wait_for(observed)
    assert end_to_end(metrics, "broadcast") == 0
