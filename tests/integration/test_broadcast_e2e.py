"""Broadcasts end to end: HTTP submission -> fan-out -> Twilio sandbox -> callbacks -> settled.

A real dispatcher service in-process (its HTTP API, broadcast runner, resumer, callbacks) and
the sandbox behind the official twilio library. The ledger audit must be clean afterwards.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from dispatcher.credits.audit import run_audit
from dispatcher.settings import Settings
from dispatcher.tokens import create_token
from tests.integration.dispatcher_fixture import (
    RunningDispatcher,
    running_dispatcher,
    wait_for,
)
from tests.integration.sandbox_fixture import SandboxHandle
from tests.integration.test_api_broadcasts import numbers_of

pytestmark = pytest.mark.timeout(240)  # the 5,000: ~30 s on a quiet box, 3x that when shared
SENDER = "+14155550199"


class Client:
    """The dispatcher's HTTP API with one account's owner token."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, account: str,
                 token: str) -> None:
        self.session, self.base, self.account, self.token = session, base_url, account, token

    async def request(self, method: str, suffix: str, body: Any = None,
                      key: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if key:
            headers["Idempotency-Key"] = key
        data = None if body is None else io.BytesIO(json.dumps(body).encode())
        async with self.session.request(method, f"{self.base}/v1/accounts/{self.account}{suffix}",
                                        data=data, headers=headers) as resp:
            return resp.status, await resp.json()

    async def progress(self, broadcast_id: str) -> dict[str, Any]:
        status, found = await self.request("GET", f"/broadcasts/{broadcast_id}")
        assert status == 200, found
        return dict(found)


@pytest.fixture(name="dispatcher")
async def quiet_dispatcher(settings: Settings, twilio_sandbox: SandboxHandle,
                           pool: asyncpg.Pool) -> AsyncIterator[RunningDispatcher]:
    """The ``dispatcher`` fixture with a long reconcile grace: callbacks, not lookups, settle."""
    async with running_dispatcher(settings, twilio_sandbox, pool,
                                  reconcile_grace_seconds=30.0) as d:
        yield d


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def client_for(dispatcher: RunningDispatcher, session: aiohttp.ClientSession,
                     credits: int, **auto: Any) -> Client:
    account = await dispatcher.funded_account(f"bc-{uuid.uuid4().hex[:8]}", credits, **auto)
    token = await create_token(dispatcher.pool, account, "owner")
    return Client(session, dispatcher.settings.public_base_url, account, token)


def recipients(count: int) -> list[dict[str, Any]]:
    per_region = -(-count // 4)
    numbers = [n for region in ("US", "GB", "DE", "FR") for n in numbers_of(region, per_region)]
    return [{"to": n, "vars": {"name": f"Customer {i}"}} for i, n in enumerate(numbers[:count])]


async def submit(client: Client, people: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    status, accepted = await client.request(
        "POST", "/broadcasts", {"body": "Hello {name}, our sale starts today!",
                                "recipients": people, "from": SENDER}, key=uuid.uuid4().hex)
    assert status == 202, accepted
    return accepted["broadcast_id"], accepted["preflight"]


async def account_row(dispatcher: RunningDispatcher, account: str) -> dict[str, Any]:
    row = await dispatcher.pool.fetchrow(
        "SELECT sub_available + purchased_available - debt AS available, reserved, paused_at "
        "FROM accounts WHERE id = $1", account)
    assert row is not None
    return dict(row)


async def test_five_thousand_recipients_reach_the_sandbox_and_settle(
        dispatcher: RunningDispatcher, session: aiohttp.ClientSession) -> None:
    client = await client_for(dispatcher, session, 6_000)
    broadcast_id, preflight = await submit(client, recipients(5_000))
    assert preflight["billable"] == 5_000 and preflight["credits"] == 5_000

    async def delivered() -> bool:
        found = await client.progress(broadcast_id)
        return bool(found["status"] == "completed" and found["delivered"] == 5_000)

    await wait_for(delivered, timeout=220, interval=0.5)
    final = await client.progress(broadcast_id)
    assert final["credits_spent"] == 5_000 and final["credits_reserved"] == 0
    assert (final["failed"], final["held"], final["canceled"], final["pending"]) == (0, 0, 0, 0)
    assert dispatcher.sandbox.state.count() == 5_000
    assert len({c.to for c in dispatcher.sandbox.state.creates()}) == 5_000
    assert await account_row(dispatcher, client.account) == {
        "available": 1_000, "reserved": 0, "paused_at": None}
    assert await run_audit(dispatcher.pool) == []


async def test_cancel_while_paused_charges_nothing_for_the_rest(
        dispatcher: RunningDispatcher, session: aiohttp.ClientSession) -> None:
    # Auto-recharge on, but no billing service runs: 150 are sent, then the account pauses.
    client = await client_for(dispatcher, session, 150, enabled=True, threshold=10, amount=500)
    broadcast_id, preflight = await submit(client, recipients(500))
    assert preflight["advice"] == "ok_with_auto_recharge"

    async def paused_with_150_delivered() -> bool:
        found = await client.progress(broadcast_id)
        return bool(found["delivered"] == 150 and found["sending"] == found["sent"] == 0
                    and found["held"] > 0)

    await wait_for(paused_with_150_delivered, timeout=60, interval=0.2)
    status, canceled = await client.request("POST", f"/broadcasts/{broadcast_id}/cancel")
    assert status == 200 and canceled["status"] == "canceled"
    assert canceled["canceled"] == 350 and canceled["held"] == canceled["pending"] == 0
    assert canceled["credits_spent"] == 150
    reserved = await dispatcher.pool.fetchval(
        "SELECT count(*) FROM reservations WHERE job_id LIKE $1", f"{broadcast_id}:%")
    assert reserved == 150
    assert (await account_row(dispatcher, client.account))["available"] == 0
    status, again = await client.request("POST", f"/broadcasts/{broadcast_id}/cancel")
    assert status == 200 and again == canceled
    assert await run_audit(dispatcher.pool) == []


async def test_cancel_while_sending_stops_the_unsent(
        dispatcher: RunningDispatcher, session: aiohttp.ClientSession) -> None:
    dispatcher.sandbox.state.configure(latency_ms=20)  # ~50 creates/s per in-flight slot
    client = await client_for(dispatcher, session, 5_000)
    broadcast_id, _ = await submit(client, recipients(1_500))

    async def some_sent() -> bool:
        found = await client.progress(broadcast_id)
        return bool(found["sent"] + found["delivered"] >= 100)

    await wait_for(some_sent, timeout=30, interval=0.05)
    status, canceled = await client.request("POST", f"/broadcasts/{broadcast_id}/cancel")
    assert status == 200 and canceled["status"] == "canceled" and canceled["canceled"] > 0

    async def settled() -> bool:
        found = await client.progress(broadcast_id)
        return bool(found["sending"] == found["sent"] == 0)

    await wait_for(settled, timeout=30, interval=0.2)
    final = await client.progress(broadcast_id)
    sent = dispatcher.sandbox.state.count()
    assert final["delivered"] == sent and final["canceled"] == 1_500 - sent
    assert final["credits_spent"] == sent
    assert (await account_row(dispatcher, client.account)) == {
        "available": 5_000 - sent, "reserved": 0, "paused_at": None}
    assert await run_audit(dispatcher.pool) == []
