"""Quiet hours and scheduled broadcasts through a real dispatcher, PostgreSQL and RabbitMQ.

The service's clock is a fixed one the test moves: no sleeping until a window ends.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from dispatcher.credits.ledger import CreditStore
from dispatcher.settings import Settings
from dispatcher.tokens import create_token
from tests.integration.dispatcher_fixture import RunningDispatcher, running_dispatcher, wait_for
from tests.integration.sandbox_fixture import SandboxHandle
from tests.integration.test_scheduled_sends import FakeClock, reserved_for, wait_status

NEW_YORK = ["+12125550100", "+12125550101", "+12125550102"]
LOS_ANGELES = ["+14155550101", "+14155550102", "+14155550103"]
LONDON = ["+447400123456", "+447400123457"]
SENDER = "+14155550199"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(at("2026-07-01T02:00:00"))  # 22:00 in New York, 19:00 in Los Angeles


@pytest.fixture
async def d(settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool,
            clock: FakeClock) -> AsyncIterator[RunningDispatcher]:
    async with running_dispatcher(settings, twilio_sandbox, pool, clock=clock.now,
                                  release_sweep_interval_seconds=0.1) as running:
        yield running


class Http:
    """The running dispatcher's API, as one account's token."""

    def __init__(self, d: RunningDispatcher, account: str, token: str) -> None:
        self.base = f"http://127.0.0.1:{d.service.http_port}/v1/accounts/{account}"
        self.token = token

    async def call(self, method: str, path: str, body: Any = None,
                   token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}",
                   "Idempotency-Key": uuid.uuid4().hex}
        async with aiohttp.ClientSession() as http, http.request(
                method, self.base + path, json=body, headers=headers) as response:
            return response.status, await response.json()


async def owner(d: RunningDispatcher, credits: int) -> tuple[str, Http]:
    account = await d.funded_account(uid("quiet"), credits)
    return account, Http(d, account, await create_token(d.pool, account, "owner", name="t"))


async def quiet(api: Http, start: str = "21:00", end: str = "08:00") -> None:
    status, body = await api.call("PUT", "/quiet-hours", {"start": start, "end": end})
    assert (status, body) == (200, {"start": start, "end": end})


async def test_quiet_hours_setting_is_for_owners_and_admins(d: RunningDispatcher) -> None:
    account, api = await owner(d, 0)
    member = await create_token(d.pool, account, "member", name="m")
    assert await api.call("GET", "/quiet-hours") == (200, {"start": None, "end": None})
    status, _ = await api.call("PUT", "/quiet-hours", {"start": "21:00", "end": "08:00"}, member)
    assert status == 403
    status, body = await api.call("PUT", "/quiet-hours", {"start": "21:00", "end": None})
    assert status == 422 and body["error"]["code"] == "invalid_request"
    await quiet(api)
    assert await api.call("GET", "/quiet-hours", token=member) == (
        200, {"start": "21:00", "end": "08:00"})
    assert await api.call("PUT", "/quiet-hours", {"start": None, "end": None}) == (
        200, {"start": None, "end": None})


async def test_bulk_is_deferred_in_the_recipients_night_and_transactional_is_not(
        d: RunningDispatcher, clock: FakeClock) -> None:
    account, api = await owner(d, 20)
    await quiet(api)
    night, evening, urgent = uid("ny-bulk"), uid("la-bulk"), uid("ny-otp")
    await d.publish_sms(night, account, to=NEW_YORK[0], priority="bulk")
    await d.publish_sms(evening, account, to=LOS_ANGELES[0], priority="bulk")
    await d.publish_sms(urgent, account, to=NEW_YORK[0], priority="transactional")
    await wait_status(d, night, "deferred")
    await wait_status(d, evening, "sent", "delivered")  # 19:00 in Los Angeles
    await wait_status(d, urgent, "sent", "delivered")  # transactional: exempt
    row = await d.job(night)
    assert row is not None and row["not_before"] == at("2026-07-01T12:00:00")  # 08:00 EDT
    assert await reserved_for(d.pool, night) == 0

    clock.advance(timedelta(hours=9, minutes=59))  # 07:59 in New York
    await wait_status(d, evening, "delivered")
    assert await d.pool.fetchval("SELECT status FROM jobs WHERE job_id = $1", night) == "deferred"
    clock.advance(timedelta(minutes=1))
    await wait_status(d, night, "sent", "delivered")
    assert await reserved_for(d.pool, night) == 1


async def test_on_the_dst_day_the_night_ends_at_eight_local(
        d: RunningDispatcher, clock: FakeClock) -> None:
    account, api = await owner(d, 5)
    await quiet(api)
    clock.at = at("2026-03-08T04:00:00")  # 23:00 EST; at 02:00 the clocks go forward
    job_id = uid("dst")
    await d.publish_sms(job_id, account, to=NEW_YORK[1], priority="bulk")
    await wait_status(d, job_id, "deferred")
    row = await d.job(job_id)
    assert row is not None and row["not_before"] == at("2026-03-08T12:00:00")  # 08:00 EDT


async def broadcast(api: Http, recipients: list[str], **extra: Any) -> tuple[int, Any]:
    return await api.call("POST", "/broadcasts", {
        "body": "Sale today", "from": SENDER, "recipients": [{"to": n} for n in recipients],
        **extra})


async def progress(api: Http, broadcast_id: str) -> dict[str, Any]:
    status, body = await api.call("GET", f"/broadcasts/{broadcast_id}")
    assert status == 200
    return dict(body)


async def test_a_broadcast_defers_recipients_in_their_night_and_counts_them(
        d: RunningDispatcher, clock: FakeClock) -> None:
    clock.at = at("2026-07-01T09:00:00")  # 05:00 in New York, 10:00 in London
    _, api = await owner(d, 20)
    await quiet(api)
    people = NEW_YORK[:2] + LONDON
    status, pre = await api.call("POST", "/broadcasts/preflight", {
        "body": "Sale today", "recipients": [{"to": n} for n in people]})
    assert status == 200
    assert pre["quiet_hours"]["deferred"] == 2
    assert at(pre["quiet_hours"]["deferred_until"][:19]) == at("2026-07-01T12:00:00")
    status, accepted = await broadcast(api, people)
    assert status == 202 and accepted["status"] == "running"
    broadcast_id = accepted["broadcast_id"]

    async def london_done_new_york_deferred() -> bool:
        p = await progress(api, broadcast_id)
        return p["deferred"] == 2 and p["delivered"] == 2
    await wait_for(london_done_new_york_deferred)
    p = await progress(api, broadcast_id)
    assert p["status"] == "running" and p["pending"] == 0
    assert p["credits_reserved"] == 0  # the deferred ones hold nothing

    clock.at = at("2026-07-01T12:00:00")

    async def completed() -> bool:
        p = await progress(api, broadcast_id)
        return p["status"] == "completed" and p["delivered"] == 4
    await wait_for(completed)
    assert (await progress(api, broadcast_id))["deferred"] == 0


async def test_canceling_a_broadcast_ends_its_deferred_recipients(
        d: RunningDispatcher, clock: FakeClock) -> None:
    account, api = await owner(d, 20)
    await quiet(api)
    status, accepted = await broadcast(api, NEW_YORK)  # 22:00 there: every one deferred
    assert status == 202
    broadcast_id = accepted["broadcast_id"]

    async def deferred() -> bool:
        return (await progress(api, broadcast_id))["deferred"] == 3
    await wait_for(deferred)
    status, after = await api.call("POST", f"/broadcasts/{broadcast_id}/cancel")
    assert status == 200 and after["status"] == "canceled"
    assert (after["deferred"], after["canceled"]) == (0, 3)
    assert await d.pool.fetchval("SELECT count(*) FROM ledger WHERE account_id = $1 AND "
                                 "kind = 'reserve'", account) == 0


async def test_a_scheduled_broadcast_is_priced_today_and_reserved_at_its_time(
        d: RunningDispatcher, clock: FakeClock) -> None:
    clock.at = at("2026-07-01T16:00:00")  # noon in New York
    account, api = await owner(d, 2)
    send_at = "2026-07-01T18:00:00+00:00"
    # Short today but scheduled: accepted, and the pre-flight says what today's balance covers.
    status, first = await broadcast(api, LOS_ANGELES, send_at=send_at)
    assert status == 202 and first["status"] == "scheduled"
    assert first["preflight"]["schedule"]["covered_today"] == 2
    p = await progress(api, first["broadcast_id"])
    assert (p["status"], p["pending"], p["send_at"][:19]) == (
        "scheduled", 3, "2026-07-01T18:00:00")
    status, canceled = await api.call("POST", f"/broadcasts/{first['broadcast_id']}/cancel")
    assert status == 200 and (canceled["status"], canceled["canceled"]) == ("canceled", 3)

    await CreditStore(d.pool).grant(account, 10, "purchase", uid("pay"))
    status, second = await broadcast(api, LOS_ANGELES, send_at=send_at)
    assert status == 202 and second["status"] == "scheduled"
    far = (clock.at + timedelta(days=40)).isoformat()
    status, body = await broadcast(api, LOS_ANGELES, send_at=far)
    assert status == 422 and body["error"]["code"] == "schedule_too_far"
    assert await d.pool.fetchval("SELECT reserved FROM accounts WHERE id = $1", account) == 0

    clock.advance(timedelta(hours=2))

    async def completed() -> bool:
        p = await progress(api, second["broadcast_id"])
        return p["status"] == "completed" and p["delivered"] == 3
    await wait_for(completed)
    assert await d.pool.fetchval("SELECT count(*) FROM ledger WHERE account_id = $1 AND "
                                 "kind = 'reserve'", account) == 3


async def test_an_amqp_broadcast_scheduled_then_canceled_by_a_cancel_job(
        d: RunningDispatcher) -> None:
    account = await d.funded_account(uid("amqp"), 10)
    broadcast_id = uid("promo")
    await d.publisher.publish({
        "schema_version": 1, "id": broadcast_id, "kind": "broadcast", "account": account,
        "from": SENDER, "body": "Sale", "recipients": [{"to": n} for n in LOS_ANGELES],
        "send_at": "2026-07-02T00:00:00Z"})

    async def stored_scheduled() -> bool:
        return await d.pool.fetchval("SELECT status FROM broadcasts WHERE id = $1",
                                     broadcast_id) == "scheduled"
    await wait_for(stored_scheduled)
    await d.publisher.publish({"schema_version": 1, "id": uid("cancel"), "kind": "cancel",
                               "account": account, "target": broadcast_id})

    async def canceled() -> bool:
        return await d.pool.fetchval("SELECT status FROM broadcasts WHERE id = $1",
                                     broadcast_id) == "canceled"
    await wait_for(canceled)
    events = await d.pool.fetch("SELECT body ->> 'status' AS status FROM outbox "
                                "WHERE body ->> 'broadcast_id' = $1", broadcast_id)
    assert sorted(e["status"] for e in events) == ["canceled"] * 3
