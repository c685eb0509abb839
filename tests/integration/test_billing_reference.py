"""The reference billing service on real PostgreSQL and RabbitMQ, with the test as the dispatcher.

The test publishes ``balance.low`` / ``balance.depleted`` with ``BillingEventPublisher`` and reads
``credits.granted`` / ``topup.failed`` from its own queue bound to the billing exchange.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from billing_client import (
    AutoRecharge,
    BalanceDepleted,
    BalanceLow,
    BillingEvent,
    BillingEventPublisher,
    CreditsGranted,
    TopupFailed,
    decode_event,
)
from billing_client.reference import (
    BillingSettings,
    FakeGateway,
    ReferenceBillingService,
    list_invoices,
    set_payment_methods,
)

ADMIN_DSN = os.environ.get("DISPATCHER_TEST_ADMIN_DSN",
                           "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("BILLING_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
WAIT_SECONDS = 10.0


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def billing_db() -> Iterator[str]:
    """A fresh, empty database for this module; the service creates its schema itself."""
    name = f"billing_t_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    yield f"{ADMIN_DSN.rpartition('/')[0]}/{name}"
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def until(check: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    """Poll ``check`` until true, or fail saying what did not happen."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Dispatcher:
    """The test's side of the contract plus the running service."""

    settings: BillingSettings
    gateway: FakeGateway
    service: ReferenceBillingService
    connection: AbstractRobustConnection
    channel: AbstractChannel
    publisher: BillingEventPublisher
    replies: list[BillingEvent] = field(default_factory=list)

    async def send(self, *events: BalanceLow | BalanceDepleted) -> None:
        for event in events:
            await self.publisher.publish(event)

    def of(self, account: str, kind: type[Any]) -> list[Any]:
        return [r for r in self.replies if r.account == account and isinstance(r, kind)]

    async def grants(self, account: str, count: int = 1) -> list[CreditsGranted]:
        await until(lambda: len(self.of(account, CreditsGranted)) >= count,
                    f"{count} credits.granted for {account}")
        return self.of(account, CreditsGranted)

    async def failures(self, account: str, count: int) -> list[TopupFailed]:
        await until(lambda: len(self.of(account, TopupFailed)) >= count,
                    f"{count} topup.failed for {account}")
        return self.of(account, TopupFailed)

    async def decided(self, count: int) -> None:
        await until(lambda: sum(self.service.decisions.values()) >= count,
                    f"{count} decisions")

    async def restart(self) -> None:
        await self.service.stop()
        self.service = ReferenceBillingService(self.settings, self.gateway)
        await self.service.start()

    async def methods(self, account: str, primary: str, backup: str | None = None) -> None:
        await set_payment_methods(self.settings, account, primary=primary, backup=backup)


@pytest.fixture
async def billing(billing_db: str) -> AsyncIterator[Dispatcher]:
    prefix = f"tbill{uuid.uuid4().hex[:8]}"
    settings = BillingSettings(
        database_url=billing_db, amqp_url=AMQP_URL, amqp_prefix=prefix,
        backoff_base_seconds=1.0, max_attempts=3, default_primary="tok_ok",
        fake_timeout_delay_seconds=0.2, outbox_sweep_seconds=0.5, shutdown_timeout_seconds=5.0)
    gateway = FakeGateway(timeout_delay=0.2)
    service = ReferenceBillingService(settings, gateway)
    await service.start()
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    exchange = await channel.get_exchange(settings.exchange)
    queue = await channel.declare_queue(f"{prefix}.test-replies", durable=True)
    for key in ("credits.granted", "topup.failed"):
        await queue.bind(exchange, routing_key=key)
    publisher = await BillingEventPublisher.connect(AMQP_URL, settings.exchange)
    harness = Dispatcher(settings, gateway, service, connection, channel, publisher)

    async def collect(message: AbstractIncomingMessage) -> None:
        harness.replies.append(decode_event(message.body))
        await message.ack()

    tag = await queue.consume(collect)
    yield harness
    await harness.service.stop()
    await publisher.close()
    await queue.cancel(tag)
    for name in (queue.name, settings.queue, settings.dead_queue):
        await channel.queue_delete(name)
    await channel.exchange_delete(settings.exchange)
    await connection.close()


def new_account() -> str:
    return f"acct-{uuid.uuid4().hex[:10]}"


def low(account: str, *, enabled: bool = True, amount: int = 1000, episode: int = 1,
        shortfall: int | None = None) -> BalanceLow:
    return BalanceLow(account=account, available=300, threshold=400, episode=episode,
                      auto_recharge=AutoRecharge(enabled=enabled, threshold=400, amount=amount),
                      shortfall=shortfall)


def depleted(account: str, *, enabled: bool = True, even_if_disabled: bool = True,
             amount: int = 1000, episode: int = 1, available: int = 0,
             held_credits: int = 10) -> BalanceDepleted:
    return BalanceDepleted(
        account=account, available=available, held_jobs=1, held_credits=held_credits,
        episode=episode, topup_requested_even_if_disabled=even_if_disabled,
        auto_recharge=AutoRecharge(enabled=enabled, threshold=400, amount=amount))


async def cli(settings: BillingSettings, *args: str) -> str:
    """Run the real CLI in a subprocess; returns its stdout."""
    env = {**os.environ, "BILLING_DATABASE_URL": settings.database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "billing_client.reference", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_low_with_auto_recharge_charges_once_invoices_and_grants(
        billing: Dispatcher) -> None:
    a, b = new_account(), new_account()
    assert "set primary" in await cli(billing.settings, "methods", "set", a,
                                      "--primary", "tok_ok")
    event_a, event_b = low(a, episode=3), low(b, amount=700)
    await billing.send(event_a, event_b)

    [grant] = await billing.grants(a)
    [grant_b] = await billing.grants(b)
    assert (grant.amount, grant.kind, grant.payment_method) == (1000, "auto_recharge", "primary")
    assert (grant.episode, grant.in_reply_to) == (3, event_a.event_id)
    assert grant_b.amount == 700
    assert grant.payment_reference != grant_b.payment_reference
    assert [c.amount for c in billing.gateway.charges_for(a)] == [1000]
    [invoice] = [json.loads(line) for line in
                 (await cli(billing.settings, "invoices", a)).splitlines()]
    assert (invoice["credits"], invoice["method"]) == (1000, "primary")
    assert invoice["payment_reference"] == grant.payment_reference
    await asyncio.sleep(0.3)
    assert len(billing.of(a, CreditsGranted)) == 1 and not billing.of(a, TopupFailed)


async def test_disabled_low_does_nothing_but_depleted_at_zero_still_tops_up(
        billing: Dispatcher) -> None:
    account = new_account()
    await billing.send(low(account, enabled=False),
                          depleted(account, enabled=False, even_if_disabled=False))
    await billing.decided(2)
    assert billing.service.decisions["auto_recharge_disabled"] == 2
    assert not billing.gateway.calls_for(account)

    await billing.send(depleted(account, enabled=False, even_if_disabled=True, amount=800))
    [grant] = await billing.grants(account)
    assert grant.amount == 800
    assert len(billing.gateway.charges_for(account)) == 1


async def test_duplicate_delivery_and_same_episode_charge_once(billing: Dispatcher) -> None:
    account = new_account()
    first = low(account)
    again_later = depleted(account, held_credits=5)  # occurred before the grant went out
    await billing.send(first, first, again_later)
    await billing.grants(account)
    await billing.decided(3)
    await asyncio.sleep(0.3)
    assert billing.service.decisions["duplicate"] == 1
    assert billing.service.decisions["start_topup"] == 1
    assert len(billing.gateway.charges_for(account)) == 1
    assert len(billing.of(account, CreditsGranted)) == 1
    assert len(await list_invoices(billing.settings, account)) == 1

    # After the grant went out, a new depletion of the episode means it was not enough.
    await billing.send(low(account), depleted(account, held_credits=1500))
    grants = await billing.grants(account, 2)
    assert [g.amount for g in grants] == [1000, 1500]
    await billing.decided(5)
    assert billing.service.decisions["start_topup"] == 2
    assert len(billing.gateway.charges_for(account)) == 2


async def test_concurrent_events_keep_one_topup_in_flight(billing: Dispatcher) -> None:
    account = new_account()
    billing.gateway.latency = 0.8
    events = [low(account, episode=n) if n % 2 else depleted(account, episode=n)
              for n in range(1, 6)]
    await asyncio.gather(*(billing.send(e) for e in events))
    await billing.grants(account)
    await billing.decided(5)
    assert billing.service.decisions["start_topup"] == 1
    assert billing.service.decisions["topup_in_flight"] == 4
    assert billing.gateway.max_concurrent[account] == 1
    assert len(billing.gateway.charges_for(account)) == 1
    await asyncio.sleep(0.3)
    assert len(billing.of(account, CreditsGranted)) == 1


async def test_primary_declined_then_backup_is_charged(billing: Dispatcher) -> None:
    account = new_account()
    await billing.methods(account, "tok_decline", "tok_ok")
    await billing.send(low(account))
    [grant] = await billing.grants(account)
    assert grant.payment_method == "backup"
    assert [c.status for c in billing.gateway.calls_for(account)] == ["declined", "succeeded"]
    assert len(billing.gateway.charges_for(account)) == 1
    [invoice] = await list_invoices(billing.settings, account)
    assert invoice["method"] == "backup"


async def test_both_methods_failing_back_off_then_give_up(billing: Dispatcher) -> None:
    account = new_account()
    await billing.methods(account, "tok_decline", "tok_insufficient_funds")
    # Past the default pause after 3 declines in a row (tests/.../test_recharge_rules.py).
    await billing.service.set_recharge_limits(account, decline_limit=10)
    event = low(account)
    await billing.send(event)
    failures = await billing.failures(account, 3)
    assert [f.attempts for f in failures] == [1, 2, 3]
    assert [f.next_attempt_at is None for f in failures] == [False, False, True]
    assert {(f.reason, f.payment_method, f.in_reply_to) for f in failures} == {
        ("insufficient_funds", "backup", event.event_id)}
    assert all("auto-recharge amount" in f.advice for f in failures)
    primary = [c.at for c in billing.gateway.calls_for(account) if c.token == "tok_decline"]
    assert len(primary) == 3
    assert primary[1] - primary[0] >= 0.95 and primary[2] - primary[1] >= 1.95
    assert not billing.gateway.charges_for(account)
    await asyncio.sleep(0.5)
    assert not billing.of(account, CreditsGranted)
    assert len(billing.gateway.calls_for(account)) == 6


async def test_shortfall_larger_than_amount_is_one_charge_closing_it(
        billing: Dispatcher) -> None:
    held, stated = new_account(), new_account()
    await billing.send(depleted(held, amount=1000, available=-200, held_credits=5000),
                          low(stated, amount=1000, shortfall=3000))
    assert [g.amount for g in await billing.grants(held)] == [5200]
    assert [g.amount for g in await billing.grants(stated)] == [3000]
    assert [c.amount for c in billing.gateway.charges_for(held)] == [5200]
    assert [c.amount for c in billing.gateway.charges_for(stated)] == [3000]


async def test_timeout_is_retried_with_the_same_key_and_never_charged_twice(
        billing: Dispatcher) -> None:
    account = new_account()
    await billing.methods(account, "tok_timeout", "tok_ok")
    await billing.send(low(account))
    [failed] = await billing.failures(account, 1)
    assert (failed.reason, failed.attempts) == ("timeout", 1)
    assert failed.next_attempt_at is not None
    [grant] = await billing.grants(account)
    assert grant.payment_method == "primary"
    calls = billing.gateway.calls_for(account)
    assert [c.token for c in calls] == ["tok_timeout", "tok_timeout"]  # the backup never ran
    assert calls[0].idempotency_key == calls[1].idempotency_key
    assert len(billing.gateway.charges_for(account)) == 1


async def test_restart_mid_backoff_resumes_the_retry(billing: Dispatcher) -> None:
    account = new_account()
    await billing.methods(account, "tok_decline")
    await billing.send(low(account))
    [failed] = await billing.failures(account, 1)
    await billing.restart()
    await billing.methods(account, "tok_ok")  # the customer fixed the card meanwhile
    [grant] = await billing.grants(account)
    assert failed.next_attempt_at is not None and grant.occurred_at >= failed.next_attempt_at
    assert sum(billing.service.decisions.values()) == 0  # resumed from the table
    assert [c.status for c in billing.gateway.calls_for(account)] == ["declined", "succeeded"]


async def test_undecodable_event_goes_to_the_dead_letter_queue(billing: Dispatcher) -> None:
    exchange = await billing.channel.get_exchange(billing.settings.exchange)
    await exchange.publish(aio_pika.Message(b"{not json"), routing_key="balance.low")
    dead = await billing.channel.get_queue(billing.settings.dead_queue)
    message = None
    deadline = time.monotonic() + WAIT_SECONDS
    while message is None and time.monotonic() < deadline:
        message = await dead.get(no_ack=True, fail=False)
        await asyncio.sleep(0.05)
    assert message is not None and message.body == b"{not json"
    assert message.headers["x-reason"] == "not_json"


async def test_cli_run_stops_gracefully_on_sigterm(billing_db: str) -> None:
    prefix = f"tbill{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BILLING_DATABASE_URL": billing_db, "BILLING_AMQP_URL": AMQP_URL,
           "BILLING_AMQP_PREFIX": prefix, "BILLING_DEFAULT_PRIMARY": "tok_ok"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "billing_client.reference", "run", env=env,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(WAIT_SECONDS):
            while b"billing_service_started" not in await proc.stderr.readline():
                pass
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_SECONDS):
            rest = await proc.stderr.read()
            assert await proc.wait() == 0
        assert b"billing_service_stopped" in rest and b"tok_ok" not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        settings = BillingSettings(amqp_prefix=prefix)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection, connection.channel() as channel:
            for name in (settings.queue, settings.dead_queue):
                await channel.queue_delete(name)
            await channel.exchange_delete(settings.exchange)


async def test_auto_recharge_uses_its_own_method_not_the_subscription_one(
        billing: Dispatcher) -> None:
    account = new_account()
    await set_payment_methods(billing.settings, account, primary="tok_ok",
                              purpose="subscription")
    await billing.methods(account, "tok_decline")
    await billing.send(low(account))
    [failed] = await billing.failures(account, 1)
    assert (failed.reason, failed.payment_method) == ("declined", "primary")
    assert [c.token for c in billing.gateway.calls_for(account)] == ["tok_decline"]
    assert not billing.of(account, CreditsGranted)
