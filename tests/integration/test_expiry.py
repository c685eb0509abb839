"""Expiry (issue 16): a job is never sent after its expires_at; one that expires while it waits
ends failed with reason expired, everything it reserved released, nothing charged.

Time moves by an injected clock (the sweep's) or by expires_at set in the past; no sleeps.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from twilio.base.exceptions import TwilioRestException

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.jobs.expiry import ExpirySweeper
from dispatcher.jobs.store import JobStore, NewJob
from dispatcher.metrics import Metrics
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import RunningDispatcher, running_dispatcher, wait_for
from tests.integration.sandbox_fixture import SandboxHandle


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def events(pool: asyncpg.Pool, job_id: str) -> list[tuple[str, str | None]]:
    rows = await pool.fetch("SELECT body FROM outbox WHERE exchange = 'events' "
                            "AND body->>'job_id' = $1 ORDER BY id", job_id)
    return [(json.loads(r["body"])["status"], json.loads(r["body"])["reason"]) for r in rows]


async def available(pool: asyncpg.Pool, account: str) -> int:
    return int(await pool.fetchval(
        "SELECT sub_available + purchased_available - debt FROM accounts WHERE id = $1",
        account))


def expired_count(metrics: Metrics, kind: str) -> float:
    return metrics.registry.get_sample_value(
        "dispatcher_jobs_total", {"kind": kind, "outcome": "expired"}) or 0.0


async def test_an_otp_held_at_zero_ends_expired_when_its_validity_passes(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 0)
    job_id = uid("otp")
    await d.publish_sms(job_id, account, body="Your code is 123456", validity_seconds=300)

    async def held() -> bool:
        return (await d.job(job_id) or {}).get("status") == "held"
    await wait_for(held)
    job = await d.job(job_id)
    assert job is not None and job["expires_at"] is not None
    assert job["expires_at"] - job["created_at"] < timedelta(seconds=301)
    metrics = Metrics(CollectorRegistry())
    # Nothing is due yet at the real time; 301 s later it is (not 72 h: the hold limit).
    assert await ExpirySweeper(d.pool, metrics).sweep() == 0
    later = ExpirySweeper(d.pool, metrics, clock=lambda: job["expires_at"] + timedelta(seconds=1))
    assert await later.sweep() == 1
    assert await later.sweep() == 0  # ended once
    after = await d.job(job_id)
    assert after is not None
    assert (after["status"], after["reason"], after["final_cost"]) == ("failed", "expired", 0)
    assert await events(d.pool, job_id) == [("held", "insufficient_credits"),
                                            ("failed", "expired")]
    assert expired_count(metrics, "sms") == 1
    assert await run_audit(d.pool) == []


async def test_a_retry_wait_job_that_expires_gives_its_credits_back(pool: asyncpg.Pool) -> None:
    account = uid("acct")
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 10, "purchase", uid("pay"))
    jobs = JobStore(pool)
    job_id = uid("sms")
    expires = datetime.now(UTC) + timedelta(minutes=5)
    payload = {"id": job_id, "expires_at": iso(expires)}
    begin = await jobs.begin(NewJob(job_id, account, "sms", "transactional", payload, 4, "US",
                                    1, 4))
    assert begin.outcome == "send"
    assert await jobs.retry_later(job_id, "provider_rate_limited", 20429, 3600) == "retry_wait"
    assert await available(pool, account) == 6
    assert await ExpirySweeper(pool, clock=lambda: expires - timedelta(seconds=1)).sweep() == 0
    assert await ExpirySweeper(pool, clock=lambda: expires).sweep() == 1
    job = await jobs.get(job_id)
    assert job is not None and (job["status"], job["reason"]) == ("failed", "expired")
    assert await available(pool, account) == 10
    status = await pool.fetchval("SELECT status FROM reservations WHERE job_id = $1", job_id)
    assert status == "released"
    assert await run_audit(pool) == []


@pytest.mark.parametrize("status", ["scheduled", "deferred", "queued"])
async def test_a_waiting_job_without_a_reservation_expires_and_charges_nothing(
        pool: asyncpg.Pool, status: str) -> None:
    account = uid("acct")
    await create_account(pool, account)
    job_id = uid(status)
    expires = datetime.now(UTC) + timedelta(hours=1)
    # As the scheduling and fairness functions leave them: a row, nothing reserved.
    await pool.execute(
        "INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate, "
        "not_before) VALUES ($1, $2, 'sms', 'bulk', $3, $4::jsonb, 2, now() + interval '2 h')",
        job_id, account, status, json.dumps({"id": job_id, "expires_at": iso(expires)}))
    assert await pool.fetchval("SELECT expires_at FROM jobs WHERE job_id = $1",
                               job_id) == expires  # set from the payload on insert
    assert await ExpirySweeper(pool, clock=lambda: expires + timedelta(seconds=1)).sweep() == 1
    job = await JobStore(pool).get(job_id)
    assert job is not None
    assert (job["status"], job["reason"], job["final_cost"]) == ("failed", "expired", 0)
    assert await events(pool, job_id) == [("failed", "expired")]
    assert await pool.fetchval("SELECT count(*) FROM ledger WHERE job_id = $1", job_id) == 0


async def test_a_job_consumed_after_its_expires_at_is_never_sent(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 10)
    to = "+14155550123"
    job_id = uid("late")
    job: dict[str, Any] = {"schema_version": 1, "id": job_id, "kind": "sms", "account": account,
                           "to": to, "from": "+14155550199", "body": "too late",
                           "expires_at": iso(datetime.now(UTC) - timedelta(seconds=5))}
    await d.publisher.publish(job)
    fresh = uid("fresh")
    await d.publish_sms(fresh, account, to=to)  # the next job of the account still goes

    async def done() -> bool:
        late, sent = await d.job(job_id), await d.job(fresh)
        return (late or {}).get("status") == "failed" and (sent or {}).get("status") in (
            "sent", "delivered")
    await wait_for(done)
    row = await d.job(job_id)
    assert row is not None and (row["reason"], row["final_cost"]) == ("expired", 0)
    assert await d.pool.fetchval("SELECT count(*) FROM reservations WHERE job_id = $1",
                                 job_id) == 0
    assert await events(d.pool, job_id) == [("failed", "expired")]
    assert d.sandbox.state.count(to=to) == 1  # only the fresh one reached Twilio
    await d.publisher.publish(job)  # the same job again: a duplicate, nothing new

    async def duplicate_counted() -> bool:
        return (d.service.metrics.registry.get_sample_value(
            "dispatcher_jobs_total", {"kind": "sms", "outcome": "duplicate"}) or 0) >= 1
    await wait_for(duplicate_counted)
    assert await events(d.pool, job_id) == [("failed", "expired")]
    assert await available(d.pool, account) == 10 - 1
    assert expired_count(d.service.metrics, "sms") == 1


async def test_validity_reaches_twilio_as_validity_period(dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 10)
    short, long_ = "+14155550124", "+14155550125"
    await d.publish_sms(uid("short"), account, to=short, validity_seconds=600)
    await d.publish_sms(uid("long"), account, to=long_,
                        expires_at=iso(datetime.now(UTC) + timedelta(hours=20)))

    async def both_created() -> bool:
        return d.sandbox.state.count(to=short) == 1 and d.sandbox.state.count(to=long_) == 1
    await wait_for(both_created)
    [created] = d.sandbox.state.creates(to=short)
    assert created.accepted and created.validity_period is not None
    assert 590 <= created.validity_period <= 600
    # 20 h is beyond Twilio's 36000 s: not passed (Twilio's own default applies).
    assert d.sandbox.state.creates(to=long_)[0].validity_period is None


@pytest.mark.parametrize("value", ["0", "36001", "soon"])
async def test_the_sandbox_refuses_a_validity_period_outside_twilio_range(
        twilio_sandbox: SandboxHandle, value: str) -> None:
    client = twilio_sandbox.client()
    with pytest.raises(TwilioRestException) as refused:
        await client.messages.create_async(to="+14155550126", from_="+14155550199",
                                           body="hi", validity_period=value)
    assert (refused.value.status, refused.value.code) == (400, 21624)
    accepted = await client.messages.create_async(to="+14155550126", from_="+14155550199",
                                                  body="hi", validity_period=36000)
    assert accepted.sid.startswith("SM")


async def test_a_released_job_past_its_expires_at_is_not_claimed(pool: asyncpg.Pool) -> None:
    account = uid("acct")
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 5, "purchase", uid("pay"))
    jobs = JobStore(pool)
    job_id = uid("sms")
    payload = {"id": job_id, "expires_at": iso(datetime.now(UTC) + timedelta(minutes=1))}
    begin = await jobs.begin(NewJob(job_id, account, "sms", "bulk", payload, 2, "US", 1, 2))
    assert begin.outcome == "send"
    # It waited for its sender's turn and a slot past its time.
    await pool.execute("UPDATE jobs SET expires_at = now() - interval '1 s' WHERE job_id = $1",
                       job_id)
    claim = await jobs.claim_for_send(job_id, begin.attempts)
    assert (claim.claimed, claim.status) == (False, "expired")
    job = await jobs.get(job_id)
    assert job is not None and (job["status"], job["reason"]) == ("failed", "expired")
    assert await available(pool, account) == 5
    assert await run_audit(pool) == []


async def test_pending_broadcast_recipients_past_expiry_end_failed_expired(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 100)
    broadcast_id = uid("bc")
    numbers = ["+14155550131", "+14155550132", "+14155550133"]
    await d.publisher.publish({
        "schema_version": 1, "id": broadcast_id, "kind": "broadcast", "account": account,
        "from": "+14155550199", "body": "sale ends soon", "metadata": {"campaign": "x"},
        "recipients": [{"to": n} for n in numbers],
        "expires_at": iso(datetime.now(UTC) - timedelta(seconds=1))})

    async def stored() -> bool:
        return bool(await d.pool.fetchval("SELECT count(*) FROM broadcasts WHERE id = $1",
                                          broadcast_id))
    await wait_for(stored)
    assert await ExpirySweeper(d.pool).sweep() == 3

    async def completed() -> bool:
        return await d.pool.fetchval("SELECT status FROM broadcasts WHERE id = $1",
                                     broadcast_id) == "completed"
    await wait_for(completed)
    counts = await d.pool.fetchrow("SELECT pending, failed, sending FROM broadcast_counts "
                                   "WHERE broadcast_id = $1", broadcast_id)
    assert dict(counts) == {"pending": 0, "failed": 3, "sending": 0}
    recount = await d.pool.fetchrow("SELECT pending, failed FROM broadcast_recount($1)",
                                    broadcast_id)
    assert dict(recount) == {"pending": 0, "failed": 3}
    rows = await d.pool.fetch(
        "SELECT routing_key, body FROM outbox WHERE body->>'broadcast_id' = $1 ORDER BY id",
        broadcast_id)
    assert [r["routing_key"] for r in rows] == ["status.broadcast.failed"] * 3
    assert {json.loads(r["body"])["reason"] for r in rows} == {"expired"}
    assert json.loads(rows[0]["body"])["metadata"] == {"campaign": "x"}
    assert sum(d.sandbox.state.count(to=n) for n in numbers) == 0
    assert await available(d.pool, account) == 100


async def test_the_service_sweeps_by_itself(settings: Settings, twilio_sandbox: SandboxHandle,
                                            pool: asyncpg.Pool) -> None:
    async with running_dispatcher(settings, twilio_sandbox, pool,
                                  expiry_sweep_interval_seconds=0.2) as d:
        account = await d.funded_account(uid("acct"), 0)
        job_id = uid("otp")
        await d.publish_sms(job_id, account, validity_seconds=600)

        async def held() -> bool:
            return (await d.job(job_id) or {}).get("status") == "held"
        await wait_for(held)
        await pool.execute("UPDATE jobs SET expires_at = now() WHERE job_id = $1", job_id)

        async def expired() -> bool:
            return (await d.job(job_id) or {}).get("reason") == "expired"
        await wait_for(expired, timeout=10)
        assert expired_count(d.service.metrics, "sms") == 1
