"""Scheduled sends and cancels through a real dispatcher, PostgreSQL and RabbitMQ.

Time is the service's injectable clock: a test moves it forward instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.dispatch.releaser import Releaser
from dispatcher.jobs.outcomes import Done, Outcome
from dispatcher.jobs.store import JobStore, NewJob
from dispatcher.metrics import Metrics
from dispatcher.settings import Settings
from dispatcher.tokens import create_token
from tests.integration.dispatcher_fixture import RunningDispatcher, running_dispatcher, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

START = datetime(2026, 7, 1, 16, 0, tzinfo=UTC)  # noon in New York: no quiet hours apply
TO = "+14155550100"


class FakeClock:
    """A clock the test moves."""

    def __init__(self, now: datetime) -> None:
        self.at = now

    def now(self) -> datetime:
        return self.at

    def advance(self, delta: timedelta) -> None:
        self.at += delta


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def d(settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool,
            clock: FakeClock) -> AsyncIterator[RunningDispatcher]:
    async with running_dispatcher(settings, twilio_sandbox, pool, clock=clock.now,
                                  release_sweep_interval_seconds=0.1) as running:
        yield running


async def status_of(d: RunningDispatcher, job_id: str) -> str | None:
    return await d.pool.fetchval("SELECT status FROM jobs WHERE job_id = $1", job_id)


async def wait_status(d: RunningDispatcher, job_id: str, *wanted: str) -> None:
    async def reached() -> bool:
        return await status_of(d, job_id) in wanted
    await wait_for(reached, timeout=20)


def creates_for(d: RunningDispatcher, job_id: str) -> int:
    return sum(1 for r in d.sandbox.state.records
               if (r.status_callback or "").endswith(f"/{job_id}"))


async def events_of(pool: asyncpg.Pool, job_id: str) -> list[tuple[str, str | None]]:
    rows = await pool.fetch("SELECT body FROM outbox WHERE body ->> 'job_id' = $1 ORDER BY id",
                            job_id)
    return [(json.loads(r["body"])["status"], json.loads(r["body"])["reason"]) for r in rows]


async def reserved_for(pool: asyncpg.Pool, job_id: str) -> int:
    return int(await pool.fetchval(
        "SELECT count(*) FROM ledger WHERE job_id = $1 AND kind = 'reserve'", job_id))


async def test_a_scheduled_sms_waits_unreserved_then_goes_once_at_its_time(
        d: RunningDispatcher, clock: FakeClock) -> None:
    account = await d.funded_account(uid("sched"), 10)
    job_id = uid("later")
    await d.publish_sms(job_id, account, to=TO,
                        send_at=(START + timedelta(hours=3)).isoformat())
    await wait_status(d, job_id, "scheduled")
    row = await d.job(job_id)
    assert row is not None and row["not_before"] == START + timedelta(hours=3)
    assert await reserved_for(d.pool, job_id) == 0  # reserved when released, not accepted
    assert await d.pool.fetchval("SELECT reserved FROM accounts WHERE id = $1", account) == 0
    await asyncio.sleep(0.5)  # several release passes: not due yet
    assert await status_of(d, job_id) == "scheduled" and creates_for(d, job_id) == 0

    clock.advance(timedelta(hours=3))
    await wait_status(d, job_id, "sent", "delivered")
    assert creates_for(d, job_id) == 1
    assert await reserved_for(d.pool, job_id) == 1
    assert (await events_of(d.pool, job_id))[0] == ("scheduled", "send_at")


async def test_a_send_at_in_the_past_goes_at_once_and_too_far_ahead_is_refused(
        d: RunningDispatcher) -> None:
    account = await d.funded_account(uid("past"), 10)
    past, far = uid("past"), uid("far")
    await d.publish_sms(past, account, to=TO, send_at=(START - timedelta(days=400)).isoformat())
    await d.publish_sms(far, account, to=TO, send_at=(START + timedelta(days=36)).isoformat())
    await wait_status(d, past, "sent", "delivered")
    assert (await events_of(d.pool, past))[0][0] == "sent"

    async def refused() -> bool:
        return ("dead_lettered", "schedule_too_far") in await events_of(d.pool, far)
    await wait_for(refused)
    assert await d.job(far) is None


async def test_cancel_over_amqp_is_idempotent_and_charges_nothing(
        d: RunningDispatcher, clock: FakeClock) -> None:
    account = await d.funded_account(uid("cancel"), 10)
    job_id, cancel_id = uid("later"), uid("cancel")
    await d.publish_sms(job_id, account, to=TO, send_at=(START + timedelta(hours=1)).isoformat())
    await wait_status(d, job_id, "scheduled")
    cancel = {"schema_version": 1, "id": cancel_id, "kind": "cancel", "account": account,
              "target": job_id}
    await d.publisher.publish(cancel)
    await wait_status(d, job_id, "canceled")
    await d.publisher.publish(cancel)  # the same cancel again: a duplicate
    await d.publisher.publish({**cancel, "target": uid("other")})  # same id, other target

    async def conflict_refused() -> bool:
        return ("dead_lettered", "job_id_conflict") in await events_of(d.pool, cancel_id)
    await wait_for(conflict_refused)
    clock.advance(timedelta(hours=2))
    await asyncio.sleep(0.5)
    assert await status_of(d, job_id) == "canceled" and creates_for(d, job_id) == 0
    assert await reserved_for(d.pool, job_id) == 0
    assert await events_of(d.pool, job_id) == [("scheduled", "send_at"),
                                               ("canceled", "canceled_by_request")]
    assert await d.pool.fetchval("SELECT count(*) FROM cancel_requests WHERE account_id = $1",
                                 account) == 1
    balance = await CreditStore(d.pool).balance(account)
    assert balance.available == 10


async def test_cancel_route_cancels_a_waiting_job_once_and_refuses_a_sent_one(
        d: RunningDispatcher) -> None:
    account = await d.funded_account(uid("api"), 10)
    other = await d.funded_account(uid("api-b"), 10)
    token = await create_token(d.pool, account, "service", name="test")
    member = await create_token(d.pool, account, "member", name="test")
    waiting, sent = uid("later"), uid("now")
    await d.publish_sms(waiting, account, to=TO, send_at=(START + timedelta(days=1)).isoformat())
    await d.publish_sms(sent, account, to=TO)
    await wait_status(d, waiting, "scheduled")
    await wait_status(d, sent, "sent", "delivered")
    base = f"http://127.0.0.1:{d.service.http_port}/v1/accounts"

    async def post(path: str, who: str = token) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.post(
                f"{base}/{path}", headers={"Authorization": f"Bearer {who}"}) as response:
            return response.status, await response.json()

    assert (await post(f"{account}/jobs/{waiting}/cancel", member))[0] == 403
    assert (await post(f"{other}/jobs/{waiting}/cancel"))[0] == 404  # another tenant's token
    for _ in range(2):  # canceling again answers the same
        status, body = await post(f"{account}/jobs/{waiting}/cancel")
        assert (status, body) == (200, {"job_id": waiting, "status": "canceled"})
    status, body = await post(f"{account}/jobs/{sent}/cancel")
    assert status == 409 and body["error"]["code"] == "not_cancelable"
    assert (await post(f"{account}/jobs/{uid('nope')}/cancel"))[0] == 404
    assert await reserved_for(d.pool, waiting) == 0


async def test_a_job_released_when_the_account_cannot_pay_is_held_then_resumed(
        d: RunningDispatcher, clock: FakeClock) -> None:
    account = await d.funded_account(uid("short"), 0)
    job_id = uid("later")
    await d.publish_sms(job_id, account, to=TO, send_at=(START + timedelta(hours=1)).isoformat())
    await wait_status(d, job_id, "scheduled")
    clock.advance(timedelta(hours=1))
    await wait_status(d, job_id, "held")
    assert await d.pool.fetchval("SELECT paused_at IS NOT NULL FROM accounts WHERE id = $1",
                                 account)
    await CreditStore(d.pool).grant(account, 5, "purchase", uid("pay"))
    await wait_status(d, job_id, "sent", "delivered")
    assert creates_for(d, job_id) == 1


async def test_a_schedule_survives_a_restart(settings: Settings, twilio_sandbox: SandboxHandle,
                                             pool: asyncpg.Pool, clock: FakeClock) -> None:
    job_id = uid("later")
    async with running_dispatcher(settings, twilio_sandbox, pool, clock=clock.now,
                                  release_sweep_interval_seconds=0.1) as first:
        account = await first.funded_account(uid("restart"), 10)
        await first.publish_sms(job_id, account, to=TO,
                                send_at=(START + timedelta(minutes=5)).isoformat())
        await wait_status(first, job_id, "scheduled")
    clock.advance(timedelta(minutes=5))
    async with running_dispatcher(settings, twilio_sandbox, pool, clock=clock.now,
                                  release_sweep_interval_seconds=0.1) as second:
        await wait_status(second, job_id, "sent", "delivered")
        assert creates_for(second, job_id) == 1


async def test_two_releasers_release_each_due_job_exactly_once(
        database_url: str, pool: asyncpg.Pool) -> None:
    account = uid("race")
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 1000, "purchase", uid("pay"))
    store = JobStore(pool)
    ids = [uid("due") for _ in range(120)]
    for job_id in ids:
        payload = {"schema_version": 1, "id": job_id, "kind": "sms", "account": account,
                   "to": TO, "from": "+14155550199", "body": "hi", "priority": "bulk"}
        begin = await store.wait(NewJob(job_id, account, "sms", "bulk", payload, 1, "US", 1, 1),
                                 "scheduled", START, "send_at")
        assert begin.outcome == "scheduled"
    sent: list[str] = []

    async def send(payload: bytes, attempt: int) -> Outcome:
        sent.append(json.loads(payload)["id"])
        await asyncio.sleep(0)
        return Done("sent")

    pools = [await asyncpg.create_pool(database_url, min_size=2, max_size=4) for _ in range(2)]
    try:
        releasers = [Releaser(p, send, Metrics(CollectorRegistry()), clock=lambda: START,
                              batch=25) for p in pools]
        results = await asyncio.gather(*(r.release_due() for r in releasers),
                                       *(r.release_due() for r in releasers))
    finally:
        for p in pools:
            await p.close()
    assert sorted(sent) == sorted(ids)  # every one, none twice
    assert sum(r.sent for r in results) == len(ids)
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE job_id = ANY($1) AND "
                               "status = 'sending'", ids) == len(ids)
    assert await pool.fetchval("SELECT reserved FROM accounts WHERE id = $1", account) == 120


async def test_a_cancel_that_overtakes_its_scheduled_job_still_cancels_it(
        d: RunningDispatcher) -> None:
    account = await d.funded_account(uid("overtake"), 10)
    job_id = uid("later")
    await d.publisher.publish({"schema_version": 1, "id": uid("cancel"), "kind": "cancel",
                               "account": account, "target": job_id})

    async def recorded() -> bool:
        return await d.pool.fetchval("SELECT outcome FROM cancel_requests WHERE target = $1",
                                     job_id) == "unknown"
    await wait_for(recorded)
    await d.publish_sms(job_id, account, to=TO, send_at=(START + timedelta(hours=1)).isoformat())
    await wait_status(d, job_id, "canceled")
    assert await events_of(d.pool, job_id) == [("canceled", "canceled_by_request")]


async def test_a_job_held_at_its_release_ages_from_its_release_not_its_creation(
        pool: asyncpg.Pool) -> None:
    account = uid("aged")
    await create_account(pool, account)  # no credits: held when released
    job_id = uid("aged")
    payload = {"schema_version": 1, "id": job_id, "kind": "sms", "account": account, "to": TO,
               "from": "+14155550199", "body": "hi"}
    now = await pool.fetchval("SELECT now()")
    await JobStore(pool).wait(NewJob(job_id, account, "sms", "transactional", payload, 1, "US",
                                     1, 1), "scheduled", now, "send_at")
    # Accepted 10 days ago for today: the hold limit (72 h) counts from today.
    await pool.execute("UPDATE jobs SET created_at = now() - interval '10 days' "
                       "WHERE job_id = $1", job_id)

    async def never(payload: bytes, attempt: int) -> Outcome:
        raise AssertionError("nothing is sent without credits")

    released = await Releaser(pool, never, Metrics(CollectorRegistry()),
                              clock=lambda: now).release_due()
    assert (released.sent, released.held) == (0, 1)
    assert await pool.fetch("SELECT * FROM expire_held_by_kind(now() - interval '72 hours', "
                            "100)") == []
    assert await pool.fetchval("SELECT status FROM jobs WHERE job_id = $1", job_id) == "held"
