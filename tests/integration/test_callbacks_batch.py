"""Status callbacks settled in batches keep the one-by-one rules: forward only, settle once."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.jobs.store import JobReport, JobStore, NewJob
from dispatcher.metrics import Metrics
from dispatcher.twilio.callbacks import StatusCallbacks


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def sending_jobs(pool: asyncpg.Pool, count: int) -> tuple[str, list[str]]:
    """An account with ``count`` jobs reserved at 2 segments x 1 credit and being sent."""
    account = uid("acct")
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 100, "purchase", uid("pay"))
    jobs = JobStore(pool)
    ids = [uid("job") for _ in range(count)]
    for job_id in ids:
        begun = await jobs.begin(NewJob(job_id, account, "sms", "bulk", {"id": job_id}, 2,
                                        "US", 2, 1))
        assert begun.outcome == "send"
    return account, ids


def sms(job_id: str, status: str, sid: str, settle: bool = False,
        units: int | None = None) -> JobReport:
    # SIDs are unique across jobs: each script run gets its own.
    return JobReport(job_id, "sms", sid and f"{sid}-{job_id}", status, settle, units, None)


def script(ids: list[str]) -> list[JobReport]:
    """Out of order, duplicated and conflicting reports, for five jobs and one unknown."""
    a, b, c, d, e = ids
    return [
        sms(a, "delivered", "SMa", settle=True, units=3),
        sms(a, "sent", "SMa"),  # arrives after delivered: no-op
        sms(a, "delivered", "SMa", settle=True, units=3),  # duplicate: no-op
        sms(a, "delivered", "SMz", settle=True, units=9),  # another SID: refused
        sms(b, "sent", "SMb"),
        sms(b, "sent", "SMb"),
        sms(c, "sent", "SMc"),
        sms(c, "failed", "SMc", settle=True),
        JobReport(d, "call", "CAd", "delivered", True, 5, None),  # not a call: ignored
        sms(e, "undelivered", None, settle=True),  # SID never known, reserved units
        sms(uid("nobody"), "delivered", "SMx", settle=True),
    ]


async def apply_one_by_one(jobs: JobStore, reports: list[JobReport]) -> list[str]:
    """What the per-callback path (look the job up, then provider_status) answers."""
    results = []
    for r in reports:
        job = await jobs.get(r.job_id)
        if job is None:
            results.append("unknown_job")
        elif job["kind"] != r.kind:
            results.append("ignored")
        else:
            cost = (r.units if r.units is not None else job["units"]) * job["rate"]
            results.append(await jobs.provider_status(
                r.job_id, r.sid, r.status, cost=cost, error_code=r.error_code,
                settle=r.settle))
    return results


async def outcome(pool: asyncpg.Pool, account: str, ids: list[str]) -> list[tuple[object, ...]]:
    rows = await pool.fetch(
        "SELECT status, provider_sid, final_cost FROM jobs WHERE job_id = ANY($1::text[])"
        " ORDER BY array_position($1::text[], job_id)", ids)
    ledger = await pool.fetch(
        "SELECT job_id, kind, amount FROM ledger WHERE account_id = $1 AND job_id IS NOT NULL"
        " ORDER BY array_position($2::text[], job_id), kind", account, ids)
    balance = await CreditStore(pool).balance(account)
    return [*((r["status"], r["provider_sid"] and r["provider_sid"][:3], r["final_cost"])
              for r in rows),
            *((ids.index(r["job_id"]), r["kind"], r["amount"]) for r in ledger),
            (balance.available, balance.reserved)]


async def test_a_batch_ends_where_the_same_reports_one_by_one_end(pool: asyncpg.Pool) -> None:
    jobs = JobStore(pool)
    one_account, one_ids = await sending_jobs(pool, 5)
    one_by_one = await apply_one_by_one(jobs, script(one_ids))
    batch_account, batch_ids = await sending_jobs(pool, 5)

    batched = await jobs.provider_status_many(script(batch_ids))

    assert batched == one_by_one
    assert batched == ["delivered", "ignored", "ignored", "sid_mismatch", "sent", "ignored",
                       "sent", "failed", "ignored", "undelivered", "unknown_job"]
    assert await outcome(pool, batch_account, batch_ids) == await outcome(
        pool, one_account, one_ids)
    settled = await pool.fetch(
        "SELECT job_id, count(*) AS n FROM ledger WHERE job_id = ANY($1::text[])"
        " AND kind IN ('capture', 'release') GROUP BY job_id", batch_ids)
    assert sorted(r["n"] for r in settled) == [1, 1, 1]  # a, c, e: each settled exactly once
    final = {r["job_id"]: r["final_cost"] for r in await pool.fetch(
        "SELECT job_id, final_cost FROM jobs WHERE job_id = ANY($1::text[])", batch_ids)}
    assert [final[j] for j in batch_ids] == [3, None, 0, None, 2]
    assert await run_audit(pool) == []

    # The same callbacks again (Twilio retries): all repeats now, nothing moves.
    assert await jobs.provider_status_many(script(batch_ids)) == await apply_one_by_one(
        jobs, script(one_ids))
    assert await outcome(pool, batch_account, batch_ids) == await outcome(
        pool, one_account, one_ids)
    assert await run_audit(pool) == []


async def test_concurrent_callbacks_share_a_batch_and_one_bad_job_fails_alone(
        pool: asyncpg.Pool) -> None:
    account, ids = await sending_jobs(pool, 4)
    # A negative rate makes settling this job raise inside the batch's transaction.
    await pool.execute("UPDATE jobs SET rate = -1 WHERE job_id = $1", ids[1])
    callbacks = StatusCallbacks(JobStore(pool), "token", "http://127.0.0.1:1",
                                Metrics(CollectorRegistry()))

    def delivered(i: int) -> dict[str, str]:
        return {"MessageSid": f"SM{i}", "MessageStatus": "delivered", "NumSegments": "1"}

    results = await asyncio.gather(*(callbacks.apply(job_id, delivered(i))
                                     for i, job_id in enumerate(ids)), return_exceptions=True)

    assert [r for i, r in enumerate(results) if i != 1] == ["delivered"] * 3
    assert isinstance(results[1], asyncpg.PostgresError)
    rows = {r["job_id"]: (r["status"], r["final_cost"]) for r in await pool.fetch(
        "SELECT job_id, status, final_cost FROM jobs WHERE account_id = $1", account)}
    assert rows[ids[1]] == ("sending", None)  # nothing of it was applied
    assert [rows[j] for j in ids if j != ids[1]] == [("delivered", 1)] * 3
    balance = await CreditStore(pool).balance(account)
    assert (balance.available, balance.reserved) == (100 - 3 - 2, 2)
    assert await run_audit(pool) == []


@pytest.mark.parametrize(("params", "status"), [
    ({"MessageStatus": "teleported"}, "sending"),  # not a status we know: ignored
    ({"MessageStatus": "sent", "CallStatus": "ringing"}, "sent"),  # the job's kind decides
])
async def test_callbacks_that_are_not_one_known_report_are_applied_one_by_one(
        pool: asyncpg.Pool, params: dict[str, str], status: str) -> None:
    _, ids = await sending_jobs(pool, 1)
    callbacks = StatusCallbacks(JobStore(pool), "token", "http://127.0.0.1:1",
                                Metrics(CollectorRegistry()))
    assert await callbacks.apply(ids[0], params) == (
        "ignored" if status == "sending" else status)
    assert await callbacks.apply(uid("nobody"), params) == "unknown_job"
    assert await pool.fetchval("SELECT status FROM jobs WHERE job_id = $1", ids[0]) == status
