"""The retry sweeper claims each due job once across replicas; the provider lookup reads every
page of a job's window and answers nothing when it cannot finish."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry

from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.dispatch.retries import RetrySweeper
from dispatcher.jobs.outcomes import Done, Outcome
from dispatcher.jobs.store import JobStore, NewJob
from dispatcher.metrics import Metrics
from dispatcher.twilio.callbacks import ProviderStatus
from dispatcher.twilio.lookup import Candidate, TwilioLookup
from dispatcher.twilio.reconcile import Reconciler
from tests.integration.sandbox_fixture import SandboxHandle

SENDER = "+14155550199"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def account_with(pool: asyncpg.Pool, credits: int) -> str:
    account = uid("acct")
    await create_account(pool, account)
    await CreditStore(pool).grant(account, credits, "purchase", uid("pay"))
    return account


async def begin(pool: asyncpg.Pool, account: str, job_id: str, to: str = "+14155550140",
                body: str = "hi") -> None:
    payload = {"schema_version": 1, "id": job_id, "kind": "sms", "account": account, "to": to,
               "from": SENDER, "body": body, "priority": "bulk"}
    started = await JobStore(pool).begin(NewJob(job_id, account, "sms", "bulk", payload, 1, "US",
                                                1, 1))
    assert started.outcome == "send"


async def test_two_sweepers_send_each_due_retry_once_and_leave_the_rest_waiting(
        pool: asyncpg.Pool) -> None:
    account = await account_with(pool, 100)
    jobs = JobStore(pool)
    due, later = [uid("due") for _ in range(60)], uid("later")
    for job_id in [*due, later]:
        await begin(pool, account, job_id)
    for job_id in due:
        await jobs.retry_later(job_id, "provider_rate_limited", 20429)
    await jobs.retry_later(later, "provider_rate_limited", 20429, 3600)
    sent: Counter[str] = Counter()

    async def send(payload: bytes, attempt: int) -> Outcome:
        await asyncio.sleep(0.01)
        sent[json.loads(payload)["id"]] += 1
        assert attempt == 2
        return Done("sent")

    sweepers = [RetrySweeper(pool, send, Metrics(CollectorRegistry()), batch=7, concurrency=10)
                for _ in range(2)]
    stop = asyncio.Event()
    runs = [asyncio.create_task(s.run(stop)) for s in sweepers]

    async def all_sent() -> bool:
        return set(sent) == set(due)
    deadline = asyncio.get_running_loop().time() + 20
    while not await all_sent():
        assert asyncio.get_running_loop().time() < deadline, sorted(set(due) - set(sent))
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*runs)
    assert set(sent.values()) == {1}
    assert await pool.fetchval("SELECT status FROM jobs WHERE job_id = $1", later) == "retry_wait"
    statuses = await pool.fetch("SELECT DISTINCT status FROM jobs WHERE job_id = ANY($1)", due)
    assert [r["status"] for r in statuses] == ["sending"]  # the fake send records nothing


async def test_the_lookup_reads_every_page_newest_first_down_to_the_window(
        twilio_sandbox: SandboxHandle) -> None:
    to, body = "+14155550141", "Your parcel is out for delivery"
    client = twilio_sandbox.client()
    old = await client.messages.create_async(to=to, from_=SENDER, body=body)
    # Sent long before this job began (an earlier, identical notification): outside its window.
    [record] = [r for r in twilio_sandbox.state.creates(to=to) if r.sid == old.sid]
    record.received_at = record.date_sent = datetime.now(UTC) - timedelta(hours=2)
    since = datetime.now(UTC)
    target = await client.messages.create_async(to=to, from_=SENDER, body=body)
    for i in range(45):
        await client.messages.create_async(to=to, from_=SENDER, body=f"other {i}")

    lookup = TwilioLookup(client, page_size=10)
    found = await lookup.find("sms", {"to": to, "from": SENDER, "body": body}, since)
    assert [c.status.sid for c in found] == [target.sid]
    assert await lookup.find("sms", {"to": to, "from": SENDER, "body": "never sent"}, since) == []


async def test_a_lookup_that_cannot_finish_resends_nothing(
        twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    account = await account_with(pool, 10)
    job_id = uid("orphan")
    await begin(pool, account, job_id, to="+14155550142")
    refused = twilio_sandbox.client(auth_token="wrong-token")  # every list read answers 401
    reconciler = Reconciler(pool, JobStore(pool), TwilioLookup(refused),
                            Metrics(CollectorRegistry()), grace=timedelta(seconds=0))
    counts = await reconciler.run_once(datetime.now(UTC) + timedelta(seconds=1))
    assert counts["lookup_failed"] >= 1 and counts["resent"] == 0
    row = await pool.fetchrow("SELECT status, retry_at FROM jobs WHERE job_id = $1", job_id)
    assert row is not None
    assert row["status"] == "sending" and row["retry_at"] is None


class SlowLookup:
    """A provider that takes its time and holds nothing; counts lookups running at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.calls = 0

    async def find(self, kind: str, payload: dict[str, Any], since: datetime) -> list[Candidate]:
        self.running += 1
        self.calls += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(0.2)
        self.running -= 1
        return []

    async def fetch(self, kind: str, sid: str) -> ProviderStatus | None:
        return None


async def test_reconcile_lookups_run_eight_at_a_time(pool: asyncpg.Pool) -> None:
    account = await account_with(pool, 100)
    orphans = [uid("orphan") for _ in range(24)]
    for job_id in orphans:
        await begin(pool, account, job_id)
    lookup = SlowLookup()
    reconciler = Reconciler(pool, JobStore(pool), lookup, Metrics(CollectorRegistry()),
                            grace=timedelta(seconds=0))
    started = time.monotonic()
    await reconciler.run_once(datetime.now(UTC) + timedelta(seconds=1))
    assert lookup.most == 8 and lookup.calls >= len(orphans)
    assert time.monotonic() - started < lookup.calls * 0.2 / 4  # not one at a time
    # Certain that none was sent: each is due for the retry sweeper, none sent from here.
    rows = await pool.fetch("SELECT status, retry_at <= now() AS due FROM jobs "
                            "WHERE job_id = ANY($1)", orphans)
    assert {(r["status"], r["due"]) for r in rows} == {("retry_wait", True)}
