"""Issue 17: the reference billing service's recharge safety rules on real PostgreSQL and
RabbitMQ, with an injected clock (an hour or a month passes in a call, not a sleep).

Charges per hour, the monthly cap with its warnings, the pause after consecutive declines,
and an owner's action (re-enable, a higher cap) charging a still-low account once, at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage

from billing_client import (
    BillingEvent,
    BillingEventPublisher,
    CreditsGranted,
    TopupCapped,
    TopupCapWarning,
    TopupDisabled,
    TopupFailed,
    decode_event,
)
from billing_client.reference import BillingSettings, FakeGateway, ReferenceBillingService
from billing_client.reference.audit import run_checks
from tests.integration.billing_stack import OffsetClock
from tests.integration.test_billing_reference import (  # noqa: F401
    AMQP_URL,
    Dispatcher,
    billing_db,
    depleted,
    low,
    new_account,
    until,
)

HOUR = timedelta(hours=1)


class Harness(Dispatcher):
    """The billing test harness, with the service's clock."""

    clock: OffsetClock

    async def advance(self, delta: timedelta) -> None:
        """Move the service's clock and let its worker look at what became due."""
        self.clock.advance(delta)
        self.service.wake()

    def events(self, account: str, kind: type[Any]) -> list[Any]:
        return self.of(account, kind)

    async def topped_up(self, account: str, episode: int, count: int) -> None:
        """Send balance.low of ``episode`` and wait for the ``count``-th grant."""
        await self.send(low(account, episode=episode, amount=self.amount))
        await self.grants(account, count)

    amount: int = 1000


@pytest.fixture
async def rules(billing_db: str) -> AsyncIterator[Harness]:  # noqa: F811
    prefix = f"trule{uuid.uuid4().hex[:8]}"
    settings = BillingSettings(
        database_url=billing_db, amqp_url=AMQP_URL, amqp_prefix=prefix,
        backoff_base_seconds=60.0, backoff_max_seconds=600.0, max_attempts=5,
        default_primary="tok_ok", outbox_sweep_seconds=0.5, shutdown_timeout_seconds=5.0)
    gateway = FakeGateway(timeout_delay=0.2)
    clock = OffsetClock()
    service = ReferenceBillingService(settings, gateway, clock=clock)
    await service.start()
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    exchange = await channel.get_exchange(settings.exchange)
    queue = await channel.declare_queue(f"{prefix}.test-replies", exclusive=True)
    await queue.bind(exchange, routing_key="#")
    publisher = await BillingEventPublisher.connect(AMQP_URL, settings.exchange)
    harness = Harness(settings, gateway, service, connection, channel, publisher)
    harness.clock = clock
    replies: list[BillingEvent] = harness.replies

    async def collect(message: AbstractIncomingMessage) -> None:
        event = decode_event(message.body)
        if event.type not in ("balance.low", "balance.depleted"):
            replies.append(event)
        await message.ack()

    await queue.consume(collect)
    try:
        yield harness
        assert await checks(billing_db) == []
    finally:
        await harness.service.stop()
        await publisher.close()
        for name in (settings.queue, settings.dead_queue):
            await channel.queue_delete(name)
        await channel.exchange_delete(settings.exchange)
        await connection.close()


async def checks(dsn: str) -> list[Any]:
    """The billing side's audit."""
    conn = await asyncpg.connect(dsn)
    try:
        return await run_checks(conn)
    finally:
        await conn.close()


async def test_at_most_three_charges_an_hour_the_fourth_waits_for_the_window(
        rules: Harness) -> None:
    account = new_account()
    for episode in (1, 2, 3):
        await rules.topped_up(account, episode, episode)
    await rules.send(low(account, episode=4))
    await until(lambda: rules.service.decisions["start_topup"] == 4, "the 4th top-up")
    await asyncio.sleep(0.5)
    assert len(rules.gateway.charges_for(account)) == 3  # the 4th waits, it is not dropped
    await rules.send(low(account, episode=5))  # the balance keeps moving: still no charge
    await until(lambda: rules.service.decisions["topup_in_flight"] == 1, "a decision")
    await rules.advance(HOUR - timedelta(minutes=1))
    await asyncio.sleep(0.3)
    assert len(rules.gateway.charges_for(account)) == 3
    await rules.advance(timedelta(minutes=2))
    grants = await rules.grants(account, 4)
    assert [g.episode for g in grants] == [1, 2, 3, 4]
    assert len(rules.gateway.charges_for(account)) == 4
    status = await rules.service.recharge_status(account)
    assert status is not None and status["hourly_limit"] == 3


async def test_monthly_cap_warns_at_80_and_90_then_caps_until_next_month(
        rules: Harness) -> None:
    account = new_account()
    await rules.service.set_recharge_limits(account, monthly_cap=1000, hourly_limit=10)
    rules.amount = 250
    for episode in (1, 2, 3, 4):  # 250, 500, 750, 1000: 100 %
        await rules.topped_up(account, episode, episode)
    await until(lambda: bool(rules.events(account, TopupCapped)), "topup.capped")
    warnings = rules.events(account, TopupCapWarning)
    assert [(w.percent, w.used, w.cap, w.unit) for w in warnings] == [
        (80, 1000, 1000, "credits"), (90, 1000, 1000, "credits")]
    [capped] = rules.events(account, TopupCapped)
    assert (capped.used, capped.refused_amount, capped.month) == (1000, None, warnings[0].month)
    assert capped.resets_at.day == 1 and capped.resets_at > rules.clock()

    await rules.send(low(account, episode=5, amount=250))
    await until(lambda: rules.service.decisions["monthly_cap"] == 1, "a capped decision")
    assert len(rules.gateway.charges_for(account)) == 4

    # Next month the cap resets: the next balance event charges again.
    await rules.advance(capped.resets_at - rules.clock() + timedelta(minutes=1))
    await rules.topped_up(account, 6, 5)
    assert len(rules.gateway.charges_for(account)) == 5


async def test_a_charge_that_would_pass_the_cap_is_refused_until_the_owner_raises_it(
        rules: Harness) -> None:
    account = new_account()
    await rules.service.set_recharge_limits(account, monthly_cap=1000, hourly_limit=10,
                                            cap_unit="money")
    rules.amount = 300
    for episode in (1, 2, 3):  # 300, 600, 900: 80 % and 90 % at once
        await rules.topped_up(account, episode, episode)
    await rules.send(low(account, episode=4, amount=300))  # 1200 would pass 1000
    await until(lambda: bool(rules.events(account, TopupCapped)), "topup.capped")
    [capped] = rules.events(account, TopupCapped)
    assert (capped.used, capped.refused_amount, capped.unit, capped.episode) == (
        900, 300, "money", 4)
    await until(lambda: bool(rules.events(account, TopupFailed)), "topup.failed")
    [failed] = rules.events(account, TopupFailed)
    assert (failed.reason, failed.next_attempt_at) == ("monthly_cap", None)
    assert [w.percent for w in rules.events(account, TopupCapWarning)] == [80, 90]
    assert len(rules.gateway.charges_for(account)) == 3

    # The owner raises the cap: the account is still low (episode 4), so one charge at once.
    verdict = await rules.service.set_recharge_limits(account, monthly_cap=2000)
    assert verdict.decision == "start_topup"
    grants = await rules.grants(account, 4)
    assert grants[-1].episode == 4 and len(rules.gateway.charges_for(account)) == 4
    await asyncio.sleep(0.3)
    assert len(rules.events(account, TopupCapWarning)) == 2  # 1200 of 2000: no warning


async def test_three_declines_in_a_row_pause_until_the_owner_turns_it_back_on(
        rules: Harness) -> None:
    account = new_account()
    await rules.methods(account, "tok_decline", "tok_insufficient_funds")
    await rules.send(low(account, episode=1))
    await rules.failures(account, 1)  # primary and backup declined: 2 in a row
    await rules.advance(timedelta(minutes=2))  # past the backoff
    [disabled] = await _wait(rules, account, TopupDisabled)
    assert disabled.declines == 3
    assert [(d.reason, d.payment_method) for d in disabled.decline_reasons] == [
        ("declined", "primary"), ("insufficient_funds", "backup"), ("declined", "primary")]
    failures = await rules.failures(account, 2)
    assert failures[-1].next_attempt_at is None  # the top-up ended with the pause
    assert [c.token for c in rules.gateway.calls_for(account)] == [
        "tok_decline", "tok_insufficient_funds", "tok_decline"]

    # Paused: new balance events charge nothing, even when the dispatcher insists at zero.
    await rules.send(depleted(account, episode=2, enabled=False, even_if_disabled=True))
    await until(lambda: rules.service.decisions["auto_recharge_paused"] == 1, "a decision")
    await rules.advance(HOUR)
    await asyncio.sleep(0.3)
    assert len(rules.gateway.calls_for(account)) == 3

    # The owner fixes the card and turns auto-recharge back on: the account is still low, so
    # it is charged once, at once.
    await rules.methods(account, "tok_ok")
    verdict = await rules.service.enable_auto_recharge(account)
    assert verdict.decision == "start_topup"
    [grant] = await rules.grants(account, 1)
    assert grant.episode == 2
    status = await rules.service.recharge_status(account)
    assert status is not None
    assert (status["paused_at"], status["consecutive_declines"]) == (None, 0)
    assert len(rules.gateway.charges_for(account)) == 1


async def test_a_success_resets_the_decline_count(rules: Harness) -> None:
    account = new_account()
    await rules.methods(account, "tok_decline", "tok_ok")
    for episode in (1, 2, 3):  # a decline each time, but never three in a row
        await rules.topped_up(account, episode, episode)
    assert not rules.events(account, TopupDisabled)
    status = await rules.service.recharge_status(account)
    assert status is not None and status["consecutive_declines"] == 0


async def _wait(rules: Harness, account: str, kind: type[Any]) -> list[Any]:
    await until(lambda: bool(rules.events(account, kind)), kind.__name__)
    return rules.events(account, kind)


async def test_cli_sets_limits_shows_enables_and_audits(rules: Harness) -> None:
    account = new_account()
    env = {**os.environ, "BILLING_DATABASE_URL": rules.settings.database_url}

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "billing_client.reference", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, _ = await cli("recharge", "limits", account, "--monthly-cap", "5000",
                             "--hourly-limit", "2", "--decline-limit", "4")
    assert code == 0 and "limits set" in out
    code, out, _ = await cli("recharge", "show", account)
    shown = json.loads(out)
    assert (shown["monthly_cap"], shown["hourly_limit"], shown["decline_limit"]) == (5000, 2, 4)
    code, _, err = await cli("recharge", "limits", account, "--hourly-limit", "0")
    assert code == 2 and "hourly_limit must be at least 1" in err
    code, out, _ = await cli("recharge", "enable", account)
    assert code == 0 and "no_balance_event" in out
    code, out, _ = await cli("audit")
    assert code == 0 and out.strip().endswith("0 problem(s)")
    assert not rules.of(account, CreditsGranted)
