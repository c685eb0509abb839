"""The ``stack`` fixture: the real dispatcher plus the reference billing service.

Both run in-process on one prefix and one database (the billing service keeps its state in
the ``billing_ref`` schema), with a tap queue that records every event either side publishes
on the ``events`` and ``billing`` exchanges.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage

from billing_client import decode_event
from billing_client.reference import (
    BillingSettings,
    ChargeResult,
    FakeGateway,
    GatewayCall,
    ReferenceBillingService,
    set_payment_methods,
)
from dispatcher.credits.ledger import CreditStore
from dispatcher.queries import q
from tests.integration.dispatcher_fixture import RunningDispatcher

ASYNCAPI = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"


@dataclass
class Tapped:
    """One message seen on an exchange."""

    exchange: str
    routing_key: str
    body: dict[str, Any]


class OffsetClock:
    """The billing service's injected clock: real time plus an offset that tests move forward
    (an hour, a month) instead of sleeping."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        """Jump forward by ``delta``."""
        self.offset += delta


class GatedGateway(FakeGateway):
    """The fake gateway, whose charges wait while ``gate`` is closed (a slow bank), and whose
    next ``decline_next`` requests are declined whatever the token (a flaky card)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = asyncio.Event()
        self.gate.set()
        self.decline_next = 0

    async def charge(self, account: str, token: str, amount_credits: int,
                     idempotency_key: str) -> ChargeResult:
        await self.gate.wait()
        if self.decline_next > 0:
            self.decline_next -= 1
            self.calls.append(GatewayCall(account, token, amount_credits, idempotency_key,
                                          "declined", None, False, time.monotonic()))
            return ChargeResult("declined")
        return await super().charge(account, token, amount_credits, idempotency_key)


@dataclass
class BillingStack:
    """A running dispatcher and reference billing service, and what they published."""

    d: RunningDispatcher
    billing: ReferenceBillingService
    gateway: GatedGateway
    billing_settings: BillingSettings
    clock: OffsetClock = field(default_factory=OffsetClock)
    tapped: list[Tapped] = field(default_factory=list)

    def seen(self, routing_key: str, account: str) -> list[dict[str, Any]]:
        """Bodies published with this routing key for this account, in arrival order."""
        return [t.body for t in self.tapped
                if t.routing_key == routing_key and t.body.get("account") == account]

    def check_contract(self) -> None:
        """Everything published follows the documented contract (docs/asyncapi.yaml)."""
        schema = json.loads(ASYNCAPI.read_text(encoding="utf-8"))["components"]["schemas"]
        account_event = schema["AccountStatusEvent"]
        for t in self.tapped:
            if t.exchange.endswith(".billing"):
                assert decode_event(json.dumps(t.body).encode()).type == t.routing_key
            elif t.routing_key.startswith("account."):
                # Every required field, and only documented ones (the spend guards' events
                # carry more of them).
                assert set(account_event["required"]) <= set(t.body), t.body
                assert set(t.body) <= set(account_event["properties"]), t.body
                assert t.routing_key == f"account.{t.body['status']}"
                assert t.body["status"] in account_event["properties"]["status"]["enum"]

    async def outbox(self, routing_key: str, account: str) -> list[dict[str, Any]]:
        """The dispatcher's outbox rows of this kind for this account, oldest first."""
        rows = await self.d.pool.fetch(
            "SELECT body FROM outbox WHERE routing_key = $1 AND body->>'account' = $2 "
            "ORDER BY id", routing_key, account)
        return [json.loads(r["body"]) for r in rows]

    async def statuses(self, account: str) -> dict[str, str]:
        rows = await self.d.pool.fetch(
            "SELECT job_id, status FROM jobs WHERE account_id = $1", account)
        return {r["job_id"]: r["status"] for r in rows}

    async def grant_lines(self, account: str) -> list[dict[str, Any]]:
        """Ledger rows of credit grants, oldest first."""
        rows = await self.d.pool.fetch(
            "SELECT kind, reference, amount FROM ledger WHERE account_id = $1 "
            "AND kind LIKE 'grant_%' ORDER BY id", account)
        return [dict(r) for r in rows]

    async def available(self, account: str) -> int:
        return (await CreditStore(self.d.pool).balance(account)).available

    async def auto_recharge(self, account: str, *, enabled: bool, threshold: int, amount: int,
                            topup_at_zero: bool | None = None) -> None:
        await self.d.pool.execute(q("set_auto_recharge"), account, enabled, threshold, amount,
                                  topup_at_zero)

    async def methods(self, account: str, primary: str, backup: str | None = None) -> None:
        """Register the account's auto-recharge payment methods with the billing service."""
        await set_payment_methods(self.billing_settings, account, primary=primary,
                                  backup=backup)

    async def cli(self, *args: str) -> tuple[int, str]:
        """Run the real ``dispatcher`` CLI against this database; (exit code, stdout)."""
        env = {**os.environ, "DISPATCHER_DATABASE_URL": self.d.settings.database_url,
               "DISPATCHER_LOG_FORMAT": "console"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dispatcher", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode is not None
        assert proc.returncode in (0, 1), err.decode()
        return proc.returncode, out.decode()


@pytest_asyncio.fixture(name="stack")
async def billing_stack_fixture(dispatcher: RunningDispatcher) -> AsyncIterator[BillingStack]:
    s = dispatcher.settings
    settings = BillingSettings(
        database_url=s.database_url, amqp_url=s.amqp_url, amqp_prefix=s.amqp_prefix,
        backoff_base_seconds=0.5, backoff_max_seconds=2.0, max_attempts=2,
        default_primary="tok_ok", outbox_sweep_seconds=0.5, shutdown_timeout_seconds=5.0)
    gateway = GatedGateway(timeout_delay=0.2)
    clock = OffsetClock()
    service = ReferenceBillingService(settings, gateway, clock=clock)
    await service.start()
    stack = BillingStack(dispatcher, service, gateway, settings, clock)
    connection = await aio_pika.connect_robust(s.amqp_url)
    channel = await connection.channel()
    tap = await channel.declare_queue(exclusive=True, auto_delete=True)
    for exchange in ("events", "billing"):
        await tap.bind(f"{s.amqp_prefix}.{exchange}", routing_key="#")

    async def record(message: AbstractIncomingMessage) -> None:
        stack.tapped.append(Tapped(message.exchange or "", message.routing_key or "",
                                   json.loads(message.body)))
        await message.ack()

    await tap.consume(record)
    try:
        yield stack
    finally:
        await stack.billing.stop()
        await connection.close()
        await drop_billing_queues(settings)


async def drop_billing_queues(settings: BillingSettings) -> None:
    """Remove the billing service's queues (the exchange belongs to the dispatcher)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in (settings.queue, settings.dead_queue):
            await channel.queue_delete(name)


__all__ = ["BillingStack", "OffsetClock", "Tapped", "billing_stack_fixture",
           "drop_billing_queues"]
