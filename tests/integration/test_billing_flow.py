"""Issue 4 end to end: the real dispatcher, the reference billing service, RabbitMQ, PostgreSQL
and the Twilio sandbox — pause at zero, auto top-up, resume in order, exactly once."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import aiohttp
import asyncpg
import pytest
from asyncpg.pool import PoolConnectionProxy
from prometheus_client import CollectorRegistry
from twilio.request_validator import RequestValidator

from billing_client import BillingEventPublisher, CreditsGranted
from billing_client.reference import BillingSettings, FakeGateway, ReferenceBillingService
from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.events.grants import CreditsListener, declare_credits_queue
from dispatcher.events.outbox import OutboxRelay
from dispatcher.events.topology import Names, declare
from dispatcher.metrics import Metrics
from dispatcher.settings import Settings
from tests.integration.billing_stack import (  # noqa: F401
    BillingStack,
    billing_stack_fixture,
    drop_billing_queues,
)
from tests.integration.dispatcher_fixture import drop_topology, wait_for


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def send_all(stack: BillingStack, account: str, ids: list[str], to: str) -> None:
    for job_id in ids:
        await stack.d.publish_sms(job_id, account, to=to, body=f"body of {job_id}")


async def all_delivered(stack: BillingStack, account: str, count: int) -> None:
    async def done() -> bool:
        s = await stack.statuses(account)
        return len(s) == count and set(s.values()) == {"delivered"}
    await wait_for(done, timeout=30)


async def top_up_after_all_held(stack: BillingStack, account: str,
                                publish: Callable[[], Awaitable[None]], held: int) -> None:
    """Publish while the bank is slow: the charge completes once ``held`` jobs wait."""
    stack.gateway.gate.clear()
    await publish()

    async def waiting() -> bool:
        return sum(v == "held" for v in (await stack.statuses(account)).values()) == held
    await wait_for(waiting)
    stack.gateway.gate.set()


def sent_in_order(stack: BillingStack, to: str, ids: list[str]) -> None:
    """Every job reached the provider exactly once, in arrival order."""
    creates = stack.d.sandbox.state.creates(to=to)
    assert [c.body for c in creates] == [f"body of {job_id}" for job_id in ids]
    assert all(c.accepted for c in creates)


async def test_auto_recharge_tops_up_at_zero_and_every_job_is_sent_once_in_order(
        stack: BillingStack) -> None:
    account = await stack.d.funded_account(uid("acct"), 10, enabled=True, threshold=5,
                                           amount=20)
    to = "+14155550101"
    ids = [f"{account}-{i:02d}" for i in range(25)]
    await top_up_after_all_held(stack, account, lambda: send_all(stack, account, ids, to), 15)
    await all_delivered(stack, account, 25)

    sent_in_order(stack, to, ids)
    [low] = await stack.outbox("balance.low", account)
    assert (low["available"], low["episode"], low["auto_recharge"]["amount"]) == (4, 1, 20)
    [depleted] = await stack.outbox("balance.depleted", account)
    assert depleted["available"] == 0
    held = [e["job_id"] for e in await stack.outbox("status.sms.held", account)]
    assert held == ids[10:]  # held at zero, in arrival order, then released in that order
    # 10 + 20 credits cover 25 jobs: one top-up, and 5 left is not below the threshold.
    [charge] = stack.gateway.charges_for(account)
    assert charge.amount == 20
    grants = await stack.grant_lines(account)
    assert [(g["kind"], g["amount"]) for g in grants] == [
        ("grant_purchase", 10), ("grant_auto_recharge", 20)]
    assert await stack.available(account) == 5

    # The next run of jobs starts a second episode: one more balance.low, one more top-up.
    more = [f"{account}-{i:02d}" for i in range(25, 45)]
    await top_up_after_all_held(stack, account, lambda: send_all(stack, account, more, to), 15)
    await all_delivered(stack, account, 45)
    sent_in_order(stack, to, ids + more)
    lows = await stack.outbox("balance.low", account)
    assert [e["episode"] for e in lows] == [1, 2]
    top_ups = [g for g in await stack.grant_lines(account) if g["kind"] == "grant_auto_recharge"]
    assert [g["amount"] for g in top_ups] == [20, 20]
    invoices = await stack.d.pool.fetch(
        "SELECT payment_reference FROM billing_ref.invoices WHERE account = $1 ORDER BY id",
        account)
    assert [f"grant:{r['payment_reference']}" for r in invoices] == [
        g["reference"] for g in top_ups]
    assert len(stack.gateway.charges_for(account)) == 2
    assert await stack.available(account) == 5
    assert await run_audit(stack.d.pool) == []
    code, out = await stack.cli("audit")
    assert code == 0 and "audit OK" in out
    assert len(stack.seen("account.paused", account)) == 2  # paused at zero once per episode
    stack.check_contract()


async def test_a_duplicated_grant_applies_once_and_resumes_the_account(
        stack: BillingStack) -> None:
    account = await stack.d.funded_account(uid("acct"), 0)
    await stack.auto_recharge(account, enabled=False, threshold=0, amount=0,
                              topup_at_zero=False)  # billing stays out of this one
    to = "+14155550102"
    ids = [f"{account}-{i}" for i in range(3)]
    await send_all(stack, account, ids, to)

    async def all_held() -> bool:
        return list((await stack.statuses(account)).values()) == ["held"] * 3
    await wait_for(all_held)
    grant = CreditsGranted(account=account, amount=10, kind="purchase",
                           payment_reference=uid("pay"))
    replay = grant.model_copy(update={"event_id": uuid.uuid4()})  # same payment, new event
    publisher = await BillingEventPublisher.connect(stack.d.settings.amqp_url,
                                                    Names(stack.d.settings.amqp_prefix)
                                                    .billing_exchange)
    async with publisher:
        for event in (grant, grant, replay):
            await publisher.publish(event)
    await all_delivered(stack, account, 3)
    await asyncio.sleep(0.3)  # the duplicates are processed too
    assert [g["amount"] for g in await stack.grant_lines(account)] == [10]
    assert await stack.available(account) == 7
    sent_in_order(stack, to, ids)
    assert not stack.gateway.calls_for(account)
    assert await run_audit(stack.d.pool) == []


async def test_primary_declined_then_the_backup_is_charged(stack: BillingStack) -> None:
    account = await stack.d.funded_account(uid("acct"), 2, enabled=True, threshold=1,
                                           amount=10)
    await stack.methods(account, "tok_decline", "tok_ok")
    to = "+14155550103"
    ids = [f"{account}-{i}" for i in range(5)]
    await send_all(stack, account, ids, to)
    await all_delivered(stack, account, 5)
    sent_in_order(stack, to, ids)
    assert [c.status for c in stack.gateway.calls_for(account)] == ["declined", "succeeded"]
    [grant] = stack.seen("credits.granted", account)
    assert grant["payment_method"] == "backup"
    assert [g["amount"] for g in await stack.grant_lines(account)] == [2, 10]
    assert await stack.available(account) == 7


async def test_both_methods_declined_keep_the_account_paused_until_a_manual_grant(
        stack: BillingStack) -> None:
    account = await stack.d.funded_account(uid("acct"), 1, enabled=True, threshold=1,
                                           amount=10)
    await stack.methods(account, "tok_decline", "tok_insufficient_funds")
    to = "+14155550104"
    ids = [f"{account}-{i}" for i in range(4)]
    await send_all(stack, account, ids, to)

    async def gave_up() -> bool:
        return len(stack.seen("topup.failed", account)) == 2
    await wait_for(gave_up)
    failures = stack.seen("topup.failed", account)
    assert [f["attempts"] for f in failures] == [1, 2]
    assert failures[0]["next_attempt_at"] is not None and failures[1]["next_attempt_at"] is None
    assert "auto-recharge amount" in failures[1]["advice"]
    primary = [c.at for c in stack.gateway.calls_for(account) if c.token == "tok_decline"]
    assert len(primary) == 2 and primary[1] - primary[0] >= 0.45  # the backoff was honoured
    await asyncio.sleep(1.0)  # no retry storm after giving up, nothing sent meanwhile
    # The third decline in a row (primary, backup, primary) paused auto-recharge: the backup
    # was not charged a fourth time (issue 17).
    assert len(stack.gateway.calls_for(account)) == 3 and not stack.gateway.charges
    [disabled] = stack.seen("topup.disabled", account)
    assert [d["payment_method"] for d in disabled["decline_reasons"]] == [
        "primary", "backup", "primary"]
    statuses = await stack.statuses(account)
    assert [statuses[i] for i in ids] == ["delivered", "held", "held", "held"]
    assert [e["status"] for e in stack.seen("account.paused", account)] == ["paused"]
    shown = json.loads((await stack.cli("accounts", "show", account))[1])
    assert (shown["paused"], shown["held_jobs"], shown["available"]) == (True, 3, 0)

    code, out = await stack.cli("credits", "grant", account, "5", "--kind", "purchase",
                                "--reference", uid("manual"))
    assert code == 0 and "granted 5" in out
    await all_delivered(stack, account, 4)
    sent_in_order(stack, to, ids)

    async def resumed_published() -> bool:
        return len(stack.seen("account.resumed", account)) == 1
    await wait_for(resumed_published)
    shown = json.loads((await stack.cli("accounts", "show", account))[1])
    assert (shown["paused"], shown["held_jobs"], shown["available"]) == (False, 0, 2)
    assert await run_audit(stack.d.pool) == []
    stack.check_contract()


async def test_overage_below_zero_requests_a_top_up_even_with_auto_recharge_off(
        stack: BillingStack) -> None:
    stack.d.sandbox.state.configure(callbacks_enabled=False)  # we report the real cost
    wants, opted_out = uid("wants"), uid("optout")
    for account in (wants, opted_out):
        await stack.d.funded_account(account, 3, enabled=False, threshold=5, amount=20)
    await stack.auto_recharge(opted_out, enabled=False, threshold=5, amount=20,
                              topup_at_zero=False)
    for account in (wants, opted_out):
        await stack.d.publish_sms(f"{account}-job", account, to="+14155550105")

    async def both_sent() -> bool:
        jobs = [await stack.d.job(f"{a}-job") for a in (wants, opted_out)]
        return all(j is not None and j["status"] == "sent" for j in jobs)
    await wait_for(both_sent)
    for account in (wants, opted_out):  # Twilio bills 4 segments for a 1-segment estimate
        await report_delivered(stack, f"{account}-job", segments=4)

    async def topped_up() -> bool:
        return await stack.available(wants) == 19  # 3 - 4 = -1, then the saved 20
    await wait_for(topped_up)
    [low] = await stack.outbox("balance.low", wants)
    assert (low["available"], low["topup_requested_even_if_disabled"]) == (-1, True)
    assert low["auto_recharge"] == {"enabled": False, "threshold": 5, "amount": 20,
                                    "changed_at": None}
    assert [c.amount for c in stack.gateway.charges_for(wants)] == [20]
    assert [g["kind"] for g in await stack.grant_lines(wants)] == [
        "grant_purchase", "grant_auto_recharge"]

    assert await stack.available(opted_out) == -1
    assert await stack.outbox("balance.low", opted_out) == []
    assert not stack.gateway.calls_for(opted_out)
    assert await run_audit(stack.d.pool) == []


async def report_delivered(stack: BillingStack, job_id: str, *, segments: int) -> None:
    """Post a signed status callback, as Twilio does, with the segments it billed."""
    job = await stack.d.job(job_id)
    assert job is not None
    url = f"{stack.d.settings.public_base_url}/twilio/status/{job_id}"
    params = {"MessageSid": job["provider_sid"], "MessageStatus": "delivered",
              "NumSegments": str(segments)}
    signature = RequestValidator(stack.d.sandbox.auth_token).compute_signature(url, params)
    async with aiohttp.ClientSession() as http, http.post(
            url, data=params, headers={"X-Twilio-Signature": signature}) as response:
        assert response.status == 204


class RelayKilled(Exception):
    """The relay died after the broker confirmed, before the rows were marked published."""


class KilledAfterConfirm(OutboxRelay):
    """A relay that dies between the broker's confirms and marking the rows published."""

    confirmed: list[int] = []

    async def _mark(self, conn: PoolConnectionProxy[asyncpg.Record], ids: list[int]) -> None:
        self.confirmed = list(ids)
        raise RelayKilled()


async def test_relay_killed_between_publish_and_mark_still_charges_once(
        settings: Settings, pool: asyncpg.Pool) -> None:
    names = Names(settings.amqp_prefix)
    gateway = FakeGateway()
    billing = ReferenceBillingService(BillingSettings(
        database_url=settings.database_url, amqp_url=settings.amqp_url,
        amqp_prefix=settings.amqp_prefix, default_primary="tok_ok",
        outbox_sweep_seconds=0.5, shutdown_timeout_seconds=5.0), gateway)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    stop = asyncio.Event()
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, names, 5)
        await billing.start()
        credits = await declare_credits_queue(await connection.channel(), names, topology)
        await credits.consume(CreditsListener(CreditStore(pool), topology).on_message)
        exchanges = {"events": topology.events, "billing": topology.billing}
        account = uid("acct")
        await create_account(pool, account, auto_recharge=(True, 5, 20))
        await CreditStore(pool).grant(account, 10, "purchase", uid("seed"))
        await CreditStore(pool).reserve(uid("job"), account, 6)  # crosses below 5

        killed = KilledAfterConfirm(pool, exchanges, Metrics(CollectorRegistry()))
        with pytest.raises(RelayKilled):
            await killed.relay_once()  # published and confirmed, never marked
        [row] = await pool.fetch("SELECT id, published_at FROM outbox "
                                 "WHERE routing_key = 'balance.low' AND body->>'account' = $1",
                                 account)
        assert killed.confirmed == [row["id"]] and row["published_at"] is None

        relay = asyncio.create_task(
            OutboxRelay(pool, exchanges, Metrics(CollectorRegistry())).run(stop))

        async def granted_and_deduplicated() -> bool:
            return (await CreditStore(pool).balance(account)).available == 24 and (
                billing.decisions["duplicate"] == 1)
        await wait_for(granted_and_deduplicated)
        stop.set()
        await relay
        assert billing.decisions["start_topup"] == 1
        assert [c.amount for c in gateway.charges_for(account)] == [20]
        assert await pool.fetchval("SELECT count(*) FROM ledger WHERE account_id = $1 "
                                   "AND kind = 'grant_auto_recharge'", account) == 1
        assert await pool.fetchval("SELECT published_at IS NOT NULL FROM outbox WHERE id = $1",
                                   row["id"])
        assert await run_audit(pool) == []
    finally:
        stop.set()
        await billing.stop()
        await connection.close()
        await drop_topology(settings)
        await drop_billing_queues(billing.settings)


async def lows(pool: asyncpg.Pool, account: str) -> list[int]:
    rows = await pool.fetch("SELECT body FROM outbox WHERE routing_key = 'balance.low' "
                            "AND body->>'account' = $1 ORDER BY id", account)
    return [json.loads(r["body"])["episode"] for r in rows]


async def test_balance_low_once_per_episode_and_never_for_a_rolled_back_crossing(
        pool: asyncpg.Pool) -> None:
    account = uid("acct")
    await create_account(pool, account, auto_recharge=(True, 5, 20))
    store = CreditStore(pool)
    await store.grant(account, 10, "purchase", uid("seed"))

    class RolledBack(Exception):
        pass

    async def cross_then_roll_back() -> None:
        async with pool.acquire() as conn, conn.transaction():
            await CreditStore(conn).reserve(uid("job"), account, 6)  # crosses below 5 ...
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE body->>'account' = $1",
                                       account) == 1
            raise RolledBack()  # ... and is rolled back: no event, no episode
    with pytest.raises(RolledBack):
        await cross_then_roll_back()
    assert await lows(pool, account) == []
    assert await pool.fetchval("SELECT low_balance_episode FROM accounts WHERE id = $1",
                               account) == 0

    first = uid("job")
    await store.reserve(first, account, 6)
    assert await lows(pool, account) == [1]
    await store.release(first)  # a failed send gives credits back: still the same episode
    await store.reserve(uid("job"), account, 7)
    await store.reserve(uid("job"), account, 1)
    assert await lows(pool, account) == [1]
    await store.grant(account, 20, "auto_recharge", uid("pay"))  # 22: the episode ends
    await store.reserve(uid("job"), account, 18)
    assert await lows(pool, account) == [1, 2]
    assert await run_audit(pool) == []
