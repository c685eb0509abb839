"""Pause at zero, hold in order, resume by itself when credits arrive, expire what waits long."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Literal

import aio_pika
import asyncpg
from prometheus_client import CollectorRegistry

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.events.resumer import Resumer, sweep_holds
from dispatcher.events.topology import Names
from dispatcher.jobs.contract import encode_job, parse_job
from dispatcher.jobs.outcomes import Done, Outcome
from dispatcher.jobs.store import JobStore, NewJob
from dispatcher.metrics import Metrics
from dispatcher.queries import q
from tests.integration.dispatcher_fixture import RunningDispatcher, wait_for


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def statuses(d: RunningDispatcher, account: str) -> dict[str, str]:
    rows = await d.pool.fetch("SELECT job_id, status FROM jobs WHERE account_id = $1", account)
    return {r["job_id"]: r["status"] for r in rows}


async def outbox(d: RunningDispatcher, account: str, key: str) -> list[dict[str, object]]:
    rows = await d.pool.fetch(
        "SELECT body FROM outbox WHERE routing_key = $1 AND body->>'account' = $2 ORDER BY id",
        key, account)
    return [json.loads(r["body"]) for r in rows]


async def test_jobs_are_held_at_zero_and_sent_in_order_once_credits_arrive(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 3, enabled=True, threshold=2, amount=10)
    to = "+14155550155"
    ids = [f"{account}-{i:02d}" for i in range(8)]
    for job_id in ids:
        await d.publish_sms(job_id, account, to=to, body=f"message {job_id}")

    async def three_sent_five_held() -> bool:
        s = await statuses(d, account)
        return (sum(v == "delivered" for v in s.values()) == 3
                and sum(v == "held" for v in s.values()) == 5)
    await wait_for(three_sent_five_held)
    paused = await d.pool.fetchval("SELECT paused_at FROM accounts WHERE id = $1", account)
    assert paused is not None
    assert len(await outbox(d, account, "balance.low")) == 1
    assert len(await outbox(d, account, "balance.depleted")) == 1

    await CreditStore(d.pool).grant(account, 10, "auto_recharge", uid("pay"))

    async def all_delivered() -> bool:
        return set((await statuses(d, account)).values()) == {"delivered"}
    await wait_for(all_delivered)
    sent_bodies = [r.body for r in d.sandbox.state.creates(to=to, accepted=True)]
    assert sent_bodies == [f"message {job_id}" for job_id in ids]
    assert await d.pool.fetchval("SELECT paused_at FROM accounts WHERE id = $1", account) is None
    assert (await CreditStore(d.pool).balance(account)).available == 5
    assert await run_audit(d.pool) == []


async def test_runs_out_again_and_pauses_again_with_the_rest_still_held(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 0)
    for i in range(6):
        await d.publish_sms(f"{account}-{i}", account)

    async def all_held() -> bool:
        s = await statuses(d, account)
        return len(s) == 6 and set(s.values()) == {"held"}
    await wait_for(all_held)
    await CreditStore(d.pool).grant(account, 2, "purchase", uid("pay"))

    async def two_out_four_held() -> bool:
        s = await statuses(d, account)
        return [s[f"{account}-{i}"] for i in range(6)] == ["delivered"] * 2 + ["held"] * 4
    await wait_for(two_out_four_held)
    assert await d.pool.fetchval("SELECT paused_at FROM accounts WHERE id = $1",
                                 account) is not None
    # Billing hears again that the account is depleted: the credits did not cover every job.
    depleted = await outbox(d, account, "balance.depleted")
    assert [(e["held_jobs"], e["available"]) for e in depleted] == [(1, 0), (4, 0)]
    assert len(await outbox(d, account, "account.paused")) == 1  # it never resumed


async def test_held_jobs_past_the_limit_expire_and_release_nothing(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 0)
    job_id = uid("old")
    await d.publish_sms(job_id, account)

    async def held() -> bool:
        return (await statuses(d, account)).get(job_id) == "held"
    await wait_for(held)
    await d.pool.execute("UPDATE jobs SET created_at = now() - interval '73 hours' "
                         "WHERE job_id = $1", job_id)

    async def expired() -> bool:
        return (await statuses(d, account)).get(job_id) == "failed"
    await wait_for(expired)
    [event] = [e for e in await d.pool.fetch(
        "SELECT id, body FROM outbox WHERE body->>'job_id' = $1 AND body->>'status' = 'failed'",
        job_id)]
    assert json.loads(event["body"])["reason"] == "insufficient_credits"

    async def published() -> bool:  # confirmed by the broker on the events exchange
        return bool(await d.pool.fetchval(
            "SELECT published_at IS NOT NULL FROM outbox WHERE id = $1", event["id"]))
    await wait_for(published)
    assert (await d.job(job_id) or {})["reason"] == "insufficient_credits"
    assert await run_audit(d.pool) == []


def expired_count(metrics: Metrics, kind: str) -> float:
    value = metrics.registry.get_sample_value(
        "dispatcher_jobs_total", {"kind": kind, "outcome": "expired"})
    assert value is not None
    return value


async def test_an_expired_held_call_is_counted_as_a_call(dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 0)
    job_id = uid("call")
    await d.publisher.publish({"schema_version": 1, "id": job_id, "kind": "call",
                               "account": account, "to": "+14155550111",
                               "from": "+14155550199", "twiml": "<Response/>",
                               "max_minutes": 2})

    async def held() -> bool:
        return (await statuses(d, account)).get(job_id) == "held"
    await wait_for(held)
    await d.pool.execute("UPDATE jobs SET created_at = now() - interval '73 hours' "
                         "WHERE job_id = $1", job_id)
    metrics = d.service.metrics

    async def counted() -> bool:
        return expired_count(metrics, "call") == 1
    await wait_for(counted)
    assert (await statuses(d, account))[job_id] == "failed"
    assert expired_count(metrics, "sms") == 0


async def held_jobs(pool: asyncpg.Pool, account: str, *kinds: Literal["sms", "call"],
                    broadcast_id: str | None = None) -> list[str]:
    """Held jobs of these kinds for an account without credits, from long ago."""
    jobs, ids = JobStore(pool), []
    for kind in kinds:
        job_id = uid(kind)
        begin = await jobs.begin(NewJob(job_id, account, kind, "bulk", {"id": job_id}, 1,
                                        "US", 1, 1, broadcast_id))
        assert begin.outcome == "held"
        ids.append(job_id)
    await pool.execute("UPDATE jobs SET created_at = '2000-01-01Z' WHERE job_id = ANY($1)", ids)
    return ids


SINCE_2001 = (datetime.now(UTC) - datetime(2001, 1, 1, tzinfo=UTC)).total_seconds()


async def test_the_hold_sweep_counts_expired_jobs_by_kind(pool: asyncpg.Pool) -> None:
    account = uid("acct")
    await create_account(pool, account)
    await held_jobs(pool, account, "sms", "call", "call")
    await held_jobs(pool, account, "sms", broadcast_id=uid("bc"))  # a broadcast recipient
    metrics = Metrics(CollectorRegistry())
    assert await sweep_holds(pool, metrics, SINCE_2001) == 4
    assert [expired_count(metrics, kind) for kind in ("sms", "call", "broadcast")] == [2, 2, 0]


async def test_a_job_released_while_the_sweep_runs_is_not_expired(pool: asyncpg.Pool) -> None:
    account = uid("acct")
    await create_account(pool, account)
    [job_id] = await held_jobs(pool, account, "sms")
    async with pool.acquire() as releasing, releasing.transaction():
        # What release_held does: the account locked, the job `sending`, not yet committed.
        await releasing.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account)
        await releasing.execute("UPDATE jobs SET status = 'sending' WHERE job_id = $1", job_id)
        sweep = asyncio.create_task(pool.fetch(
            q("expire_held_by_kind"), datetime(2001, 1, 1, tzinfo=UTC), 1000))

        async def sweep_waits_for_the_account() -> bool:
            return bool(await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%expire_held_by_kind(%'"))
        await wait_for(sweep_waits_for_the_account)
    assert await sweep == []
    assert await pool.fetchval("SELECT status FROM jobs WHERE job_id = $1", job_id) == "sending"


async def time_to_send(d: RunningDispatcher, account: str, count: int,
                       paused: str | None = None) -> float:
    """Seconds from publishing ``count`` jobs of ``account`` until all are sent; with
    ``paused``, a job of that account is published before each one (and must be held)."""
    ids = [uid("b") for _ in range(count)]
    started = time.monotonic()
    for job_id in ids:
        if paused is not None:
            await d.publish_sms(uid("held"), paused)
        await d.publish_sms(job_id, account)

    async def all_sent() -> bool:
        rows = await d.pool.fetch("SELECT status FROM jobs WHERE job_id = ANY($1::text[])", ids)
        return len(rows) == count and all(r["status"] in ("sent", "delivered") for r in rows)
    await wait_for(all_sent, timeout=20, interval=0.01)
    return time.monotonic() - started


async def test_another_account_flows_while_one_is_paused_with_10000_held_jobs(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    flowing = await d.funded_account(uid("flowing"), 1000)
    await time_to_send(d, flowing, 10)  # warm up connections and caches
    baseline = await time_to_send(d, flowing, 40)

    paused = await d.funded_account(uid("paused"), 0)
    await d.publish_sms(uid("first"), paused)

    async def is_paused() -> bool:
        return bool(await d.pool.fetchval(
            "SELECT paused_at IS NOT NULL FROM accounts WHERE id = $1", paused))
    await wait_for(is_paused)
    # 10,000 more held jobs for the paused account, as if they had arrived.
    await d.pool.execute(
        "INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate, "
        "country, units, rate, hold_seq) "
        "SELECT $1 || '-' || g, $1, 'sms', 'bulk', 'held', '{}'::jsonb, 1, 'US', 1, 1, "
        "nextval('job_hold_seq') FROM generate_series(1, 10000) g", paused)

    # The paused account keeps publishing, interleaved on the same queues.
    beside = await time_to_send(d, flowing, 40, paused=paused)
    held = await d.pool.fetchval(
        "SELECT count(*) FROM jobs WHERE account_id = $1 AND status = 'held'", paused)
    assert held == 10_041
    print(f"40 jobs sent in {baseline:.2f}s alone, {beside:.2f}s beside 10,041 held jobs "
          "and 40 more arriving for the paused account")
    # Each held job costs one short transaction and an ack, nothing more: no added delay
    # beyond handling the paused account's own messages (a generous bound for a noisy box).
    assert beside < 2 * baseline + 1.0


async def test_a_long_resume_does_not_hold_up_another_accounts_resume(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    big, small = await d.funded_account(uid("big"), 0), await d.funded_account(uid("small"), 0)
    big_ids = [f"{big}-{i:03d}" for i in range(80)]
    for job_id in big_ids:
        await d.publish_sms(job_id, big, body=job_id)
    for i in range(3):
        await d.publish_sms(f"{small}-{i}", small)

    async def all_held() -> bool:
        return [len(await statuses(d, a)) for a in (big, small)] == [80, 3] and {
            v for a in (big, small) for v in (await statuses(d, a)).values()} == {"held"}
    await wait_for(all_held, timeout=30)
    store = CreditStore(d.pool)
    await store.grant(big, 80, "purchase", uid("pay"))
    await store.grant(small, 3, "purchase", uid("pay"))

    async def small_sent() -> bool:
        return all(v in ("sent", "delivered") for v in (await statuses(d, small)).values())
    await wait_for(small_sent)
    big_held = sum(v == "held" for v in (await statuses(d, big)).values())
    assert big_held > 0, "the small account waited for the big one's whole backlog"

    async def big_sent() -> bool:
        return all(v in ("sent", "delivered") for v in (await statuses(d, big)).values())
    await wait_for(big_sent, timeout=60)
    sent = [r.body for r in d.sandbox.state.creates(accepted=True) if r.body in big_ids]
    assert sent == big_ids  # in arrival order, each once


async def test_a_released_job_the_reconciler_took_over_is_not_sent_twice(
        pool: asyncpg.Pool) -> None:
    account = uid("acct")
    await create_account(pool, account)
    jobs = JobStore(pool)
    ids = [uid("job") for _ in range(3)]
    for job_id in ids:
        begin = await jobs.begin(NewJob(job_id, account, "sms", "bulk", {"id": job_id}, 1,
                                        "US", 1, 1))
        assert begin.outcome == "held"
    await CreditStore(pool).grant(account, 3, "purchase", uid("pay"))
    sent: list[str] = []

    async def send(payload: bytes, attempt: int) -> Outcome:
        job_id = json.loads(payload)["id"]
        sent.append(job_id)
        if job_id == ids[0]:
            # Meanwhile the reconciler decides the last job waited too long and claims it.
            far = datetime.now(UTC) + timedelta(hours=1)
            assert await pool.fetchval(q("claim_stuck_job"), ids[2], "sending", far)
        return Done("sent")

    assert await Resumer(pool, send, Metrics(CollectorRegistry())).resume(account) == "resumed"
    assert sent == ids[:2]  # the reconciler's now: one provider call at most



async def test_one_accounts_burst_shares_round_trips_and_keeps_arrival_order(
        dispatcher: RunningDispatcher) -> None:
    """An account's turn ends once its job is queued for the group commit: a burst from one
    account goes in shared batches (one job per round trip before), yet reserves strictly in
    arrival order — the jobs the credits cover are the first ones, each sent once, and every
    later one is held. (The order in which the provider sees concurrent creates is timing:
    they travel on several connections at once.)"""
    d = dispatcher
    account = await d.funded_account(uid("burst"), 25)
    ids = [f"{account}-{i:03d}" for i in range(60)]
    assert d.service.handler is not None
    begins_before = d.service.handler.round_trips["begins"]
    connection = await aio_pika.connect(d.settings.amqp_url)
    async with connection:
        # One channel without per-message confirms: the burst reaches the queue in order.
        channel = await connection.channel(publisher_confirms=False)
        jobs = await channel.get_exchange(Names(d.settings.amqp_prefix).jobs_exchange)
        for job_id in ids:
            body = encode_job(parse_job(json.dumps({
                "schema_version": 1, "id": job_id, "kind": "sms", "account": account,
                "to": "+14155550100", "from": "+14155550199", "body": job_id}).encode()))
            await jobs.publish(aio_pika.Message(body, message_id=job_id, type="sms"),
                               routing_key="sms.transactional")

        async def all_settled() -> bool:
            by_id = await statuses(d, account)
            return len(by_id) == len(ids) and not {"received", "sending"} & set(by_id.values())
        await wait_for(all_settled, timeout=30)
    by_id = await statuses(d, account)
    assert all(by_id[j] in ("sent", "delivered") for j in ids[:25])
    assert all(by_id[j] == "held" for j in ids[25:])
    sent = [r.body for r in d.sandbox.state.creates(accepted=True) if r.body in ids]
    assert sorted(sent) == ids[:25]
    assert d.service.handler.round_trips["begins"] - begins_before < len(ids)
