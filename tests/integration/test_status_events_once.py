"""Status events are exactly a job's forward status changes: `sent` once, whoever tells first."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.jobs.store import JobStore, NewJob

Step = Callable[[JobStore, str], Awaitable[object]]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def a_sending_job(pool: asyncpg.Pool) -> str:
    account = uid("acct")
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 100, "purchase", uid("pay"))
    job_id = uid("job")
    begun = await JobStore(pool).begin(NewJob(job_id, account, "sms", "bulk", {"id": job_id}, 2,
                                              "US", 2, 1))
    assert begun.outcome == "send"
    return job_id


async def events(pool: asyncpg.Pool, job_id: str) -> list[str]:
    return [r["status"] for r in await pool.fetch(
        "SELECT body ->> 'status' AS status FROM outbox"
        " WHERE exchange = 'events' AND body ->> 'job_id' = $1 ORDER BY id", job_id)]


def accepted(jobs: JobStore, job_id: str) -> Awaitable[object]:
    return jobs.accepted(job_id, f"SM{job_id}")


def accepted_in_a_batch(jobs: JobStore, job_id: str) -> Awaitable[object]:
    return jobs.accepted_many([(job_id, f"SM{job_id}")])


def callback(status: str, settle: bool = False) -> Step:
    def step(jobs: JobStore, job_id: str) -> Awaitable[object]:
        return jobs.provider_status(job_id, f"SM{job_id}", status, cost=2, settle=settle)
    return step


@pytest.mark.parametrize(("steps", "expected"), [
    ([accepted, callback("sent"), callback("delivered", True)], ["sent", "delivered"]),
    ([callback("sent"), accepted, callback("delivered", True)], ["sent", "delivered"]),
    ([callback("sent"), accepted_in_a_batch, accepted], ["sent"]),
    ([accepted_in_a_batch, accepted, callback("sent")], ["sent"]),
    # A settling report that repeats the status settles but is not a second event.
    ([accepted, callback("sent", True)], ["sent"]),
    ([callback("delivered", True), accepted, callback("sent")], ["delivered"]),
    ([callback("failed", True), accepted], ["failed"]),
], ids=["create-first", "callback-first", "callback-then-batch", "batch-first",
        "settling-repeat", "delivered-first", "failed-first"])
async def test_each_status_event_is_written_once(pool: asyncpg.Pool, steps: list[Step],
                                                 expected: list[str]) -> None:
    job_id = await a_sending_job(pool)
    jobs = JobStore(pool)
    for step in steps:
        await step(jobs, job_id)
    assert await events(pool, job_id) == expected
    job = await jobs.get(job_id)
    assert job is not None
    assert job["status"] == expected[-1]
    assert job["provider_sid"] == f"SM{job_id}"
