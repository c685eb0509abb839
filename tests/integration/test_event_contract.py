"""The event contract checked against the running service, not only its examples (issue 14).

One run of the real dispatcher and reference billing service emits everything the document
promises: sms and call jobs through every status, a broadcast with skipped, held and canceled
recipients, a pause and resume, refused jobs, and every billing event. A subscriber bound to
the events and billing exchanges and the dead-letter queue checks each message against
docs/asyncapi.yaml (tests/integration/event_contract.py), and the run fails when a documented
channel or status is never emitted.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from dispatcher.broadcasts.runner import BroadcastRunner, Broadcasts, cancel
from dispatcher.credits.guards import GuardSettings, release_velocity, set_guards
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.rates import RateCache
from dispatcher.credits.subscriptions import create_account
from dispatcher.events.outbox import MANDATORY_EXCHANGES
from dispatcher.events.topology import Names, declare, delete_all
from dispatcher.jobs.contract import BroadcastJob, StatusEvent, parse_job
from dispatcher.jobs.outcomes import Done, Outcome
from dispatcher.queries import q
from dispatcher.sandbox.state import NumberRule
from dispatcher.settings import Settings
from tests.integration.billing_stack import (  # noqa: F401
    BillingStack,
    billing_stack_fixture,
)
from tests.integration.dispatcher_fixture import wait_for
from tests.integration.event_contract import Contract, Seen, load
from tests.integration.test_api_broadcasts import numbers_of

pytestmark = pytest.mark.timeout(240)

SENDER = "+14155550199"
DELIVERED = "+14155550160"
UNDELIVERED = "+14155550161"  # accepted, then undelivered (30007)
REFUSED = "+14155550162"  # refused with 21211: failed
ANSWERED_500 = "+14155550163"  # accepted, answered 500: unknown, then delivered
FINAL = {"delivered", "undelivered", "failed", "canceled"}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Tap:
    """Everything a subscriber of the events and billing exchanges and the dead queue got."""

    prefix: str
    seen: list[Seen] = field(default_factory=list)

    def events(self) -> list[dict[str, Any]]:
        return [s.json() for s in self.seen if s.source == "events"]

    def statuses(self, job_id: str) -> list[str]:
        return [e["status"] for e in self.events() if e.get("job_id") == job_id]


async def tap(connection: AbstractRobustConnection, prefix: str) -> Tap:
    """Bind before anything is published; the dead queue is declared as the document says."""
    found = Tap(prefix)
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    for exchange in ("events", "billing"):
        await queue.bind(f"{prefix}.{exchange}", routing_key="#")

    async def record(message: AbstractIncomingMessage) -> None:
        found.seen.append(Seen.of(message, prefix))
        await message.ack()

    async def record_dead(message: AbstractIncomingMessage) -> None:
        found.seen.append(Seen.of(message, prefix, source="dead"))
        await message.ack()

    await queue.consume(record)
    dead = await declare_dead_queue_as_documented(channel, prefix)
    await dead.consume(record_dead)
    return found


async def declare_dead_queue_as_documented(channel: aio_pika.abc.AbstractChannel,
                                           prefix: str) -> aio_pika.abc.AbstractQueue:
    """What a consumer reading the document does; RabbitMQ refuses any other arguments (406)."""
    documented = load()["channels"]["dispatcher.dead"]
    queue = documented["bindings"]["amqp"]["queue"]
    return await channel.declare_queue(
        queue["name"].replace("dispatcher.", f"{prefix}.", 1), durable=queue["durable"],
        exclusive=queue["exclusive"], auto_delete=queue["autoDelete"],
        arguments=documented.get("x-queue-arguments"))


async def publish_raw(connection: AbstractRobustConnection, prefix: str, body: bytes,
                      routing_key: str, message_id: str | None, kind: str | None) -> None:
    """A job the helper would refuse to publish, with the properties it would set."""
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(Names(prefix).jobs_exchange)
    await exchange.publish(aio_pika.Message(
        body, content_type="application/json", content_encoding="utf-8",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message_id, type=kind),
        routing_key=routing_key)
    await channel.close()


async def statuses(stack: BillingStack, account: str) -> dict[str, str]:
    return await stack.statuses(account)


async def sms_and_call_through_a_pause(stack: BillingStack) -> tuple[str, list[str]]:
    """Every provider outcome, then a pause at zero and a resume by an auto top-up."""
    d = stack.d
    for to, rule in ((UNDELIVERED, NumberRule(error_code=30007)),
                     (REFUSED, NumberRule(error_code=21211)),
                     (ANSWERED_500, NumberRule(accept_then_500=True))):
        d.sandbox.state.set_rule(to, rule)
    account = await d.funded_account(uid("main"), 6, enabled=True, threshold=4, amount=50)
    stack.gateway.gate.clear()  # the top-up started by balance.low waits: the account pauses
    ids = [f"{account}-{n}" for n in range(9)]
    for job_id, to in zip(ids[:4], (DELIVERED, UNDELIVERED, REFUSED, ANSWERED_500),
                          strict=True):
        await d.publish_sms(job_id, account, to=to, metadata={"order": job_id})
    await d.publisher.publish({"schema_version": 1, "id": ids[4], "kind": "call",
                               "account": account, "from": SENDER, "to": DELIVERED,
                               "twiml": "<Response/>", "max_minutes": 1,
                               "metadata": {"order": ids[4]}})
    for job_id in ids[5:]:
        await d.publish_sms(job_id, account, to=DELIVERED, metadata={"order": job_id})

    async def paused() -> bool:
        return "held" in (await statuses(stack, account)).values()
    await wait_for(paused, timeout=60)
    stack.gateway.gate.set()

    async def all_final() -> bool:
        found = await statuses(stack, account)
        return len(found) == len(ids) and set(found.values()) <= FINAL
    await wait_for(all_final, timeout=90)
    return account, ids


async def spend_guards_hold_and_release(stack: BillingStack) -> None:
    """account.velocity_held / velocity_released and account.capped / uncapped (issue 17)."""
    d = stack.d
    account = await d.funded_account(uid("guarded"), 100)
    await set_guards(d.pool, account, GuardSettings(
        daily_spend_cap=2, velocity_window_seconds=3600, velocity_multiple=2.0,
        velocity_min_credits=1))
    ids = [f"{account}-{n}" for n in range(3)]

    async def status_is(job_id: str, wanted: str) -> None:
        async def reached() -> bool:
            return (await statuses(stack, account)).get(job_id) == wanted
        await wait_for(reached, timeout=30)

    await d.publish_sms(ids[0], account, to=DELIVERED, priority="bulk")
    await status_is(ids[0], "delivered")
    await d.publish_sms(ids[1], account, to=DELIVERED, priority="bulk")
    await status_is(ids[1], "held")  # velocity: 2 credits in the window, threshold 1
    assert await release_velocity(d.pool, account)
    await status_is(ids[1], "delivered")
    await d.publish_sms(ids[2], account, to=DELIVERED, priority="bulk")
    await status_is(ids[2], "held")  # the daily cap of 2
    await set_guards(d.pool, account, GuardSettings(daily_spend_cap=10))  # uncapped
    await status_is(ids[2], "delivered")


async def a_failed_top_up(stack: BillingStack) -> str:
    """balance.low for an account whose card is declined: topup.failed."""
    account = await stack.d.funded_account(uid("declined"), 0, enabled=True, threshold=5,
                                           amount=10)
    await stack.methods(account, "tok_decline")
    await CreditStore(stack.d.pool).grant(account, 1, "purchase", uid("pay"))
    return account


async def a_capped_and_a_paused_auto_recharge(stack: BillingStack) -> None:
    """One charge that fills a small monthly cap (cap warnings, topup.capped), and a card
    declined three times in a row (topup.disabled)."""
    capped = await stack.d.funded_account(uid("capped"), 0, enabled=True, threshold=5,
                                          amount=10)
    await stack.billing.set_recharge_limits(capped, monthly_cap=10)
    paused = await stack.d.funded_account(uid("paused"), 0, enabled=True, threshold=5,
                                          amount=10)
    await stack.methods(paused, "tok_decline", "tok_decline")
    for account in (capped, paused):
        await CreditStore(stack.d.pool).grant(account, 1, "adjustment", uid("adj"))


async def a_broadcast_held_then_canceled(stack: BillingStack, numbers: list[str]) -> str:
    """3 of 6 recipients paid for and sent, 3 held then canceled; 3 more skipped."""
    d = stack.d
    account = await d.funded_account(uid("bc"), 3)
    await stack.auto_recharge(account, enabled=False, threshold=0, amount=0, topup_at_zero=False)
    opted_out = numbers[6]
    await d.pool.execute(q("api_opt_out_add"), account, opted_out, "api")
    people = [{"to": n} for n in numbers[:6]]
    people += [{"to": opted_out}, {"to": "+10005550100"}, {"to": numbers[0]}]
    broadcast_id = uid("promo")
    await d.publisher.publish({"schema_version": 1, "id": broadcast_id, "kind": "broadcast",
                               "account": account, "from": SENDER, "body": "Sale today",
                               "recipients": people, "metadata": {"campaign": "contract"}})

    async def sent_and_held() -> bool:
        found = list((await statuses(stack, account)).values())
        return found.count("held") == 3 and found.count("delivered") == 3
    await wait_for(sent_and_held, timeout=60)
    assert await cancel(d.pool, broadcast_id) == "canceled"
    return broadcast_id


async def refused_jobs(stack: BillingStack, connection: AbstractRobustConnection,
                       prefix: str) -> list[str]:
    """Refused by the contract (two of them readable) and by the dispatcher (unknown accounts)."""
    invalid = {"schema_version": 1, "id": uid("bad-to"), "kind": "sms", "account": "acme",
               "from": SENDER, "to": "0044207183875", "body": "hi", "metadata": {"k": "v"}}
    await publish_raw(connection, prefix, json.dumps(invalid).encode(), "sms.transactional",
                      invalid["id"], "sms")
    await publish_raw(connection, prefix, b"hello?", "sms.bulk", None, None)
    ghost = uid("ghost")
    call_id, broadcast_id = uid("ghost-call"), uid("ghost-promo")
    await stack.d.publisher.publish({"schema_version": 1, "id": call_id, "kind": "call",
                                     "account": ghost, "from": SENDER, "to": DELIVERED,
                                     "url": "https://example.com/twiml", "max_minutes": 2})
    await stack.d.publisher.publish({"schema_version": 1, "id": broadcast_id,
                                     "kind": "broadcast", "account": ghost, "from": SENDER,
                                     "body": "hi", "recipients": [{"to": DELIVERED}]})
    return [str(invalid["id"]), call_id, broadcast_id]


async def quiet_account(stack: BillingStack) -> tuple[str, float]:
    """An account whose quiet hours are on now where DELIVERED is (a window around the local
    time), and when it was set: the dispatcher sees a change within 5 s."""
    account = await stack.d.funded_account(uid("waiting"), 5)
    local = datetime.now(ZoneInfo("America/Los_Angeles"))  # DELIVERED is a 415 number
    await stack.d.pool.execute(q("set_quiet_hours"), account,
                               (local - timedelta(hours=1)).time(),
                               (local + timedelta(hours=1)).time())
    return account, time.monotonic()


async def waiting_jobs(stack: BillingStack, quiet: tuple[str, float]) -> tuple[str, str, str]:
    """A scheduled job canceled by a cancel job, a bulk job deferred by quiet hours, and a
    cancel refused (unknown account)."""
    d = stack.d
    account, set_at = quiet
    await asyncio.sleep(max(0.0, set_at + 5.5 - time.monotonic()))  # usually long past
    later, deferred, refused = uid("later"), uid("deferred"), uid("cancel-ghost")
    await d.publish_sms(later, account, to=DELIVERED,
                        send_at=(datetime.now(UTC) + timedelta(days=1)).isoformat())
    await d.publish_sms(deferred, account, to=DELIVERED, priority="bulk")

    async def scheduled() -> bool:
        return await d.pool.fetchval("SELECT status FROM jobs WHERE job_id = $1",
                                     later) == "scheduled"
    await wait_for(scheduled)
    await d.publisher.publish({"schema_version": 1, "id": uid("cancel"), "kind": "cancel",
                               "account": account, "target": later})
    await d.publisher.publish({"schema_version": 1, "id": refused, "kind": "cancel",
                               "account": uid("ghost"), "target": later})
    return later, deferred, refused


async def everything_relayed(stack: BillingStack, found: Tap, dead_letters: int) -> None:
    async def relayed() -> bool:
        rows = await stack.d.pool.fetch("SELECT event_id::text, published_at FROM outbox")
        got = {s.properties["message_id"] for s in found.seen}
        dead = sum(s.source == "dead" for s in found.seen)
        return (all(r["published_at"] is not None and r["event_id"] in got for r in rows)
                and dead >= dead_letters)
    await wait_for(relayed, timeout=60)
    await asyncio.sleep(0.5)  # what the billing service sends in answer, if anything late


@pytest.fixture
async def amqp(stack: BillingStack) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(stack.d.settings.amqp_url)
    yield connection
    await connection.close()


async def test_every_event_follows_the_document_and_every_documented_event_is_emitted(
        stack: BillingStack, amqp: AbstractRobustConnection) -> None:
    prefix = stack.d.settings.amqp_prefix
    found = await tap(amqp, prefix)
    contract = Contract()
    quiet = await quiet_account(stack)
    declined = await a_failed_top_up(stack)
    await a_capped_and_a_paused_auto_recharge(stack)
    account, ids = await sms_and_call_through_a_pause(stack)
    broadcast_id = await a_broadcast_held_then_canceled(stack, numbers_of("US", 7))
    refused = await refused_jobs(stack, amqp, prefix)
    later, deferred, refused_cancel = await waiting_jobs(stack, quiet)
    await spend_guards_hold_and_release(stack)

    async def declined_reported() -> bool:
        keys = {s.routing_key for s in found.seen}
        return {"topup.failed", "topup.capped", "topup.disabled"} <= keys
    await wait_for(declined_reported, timeout=30)
    await everything_relayed(stack, found, dead_letters=5)

    problems: set[str] = set()
    for seen in found.seen:
        channel, wrong = contract.check(seen)
        problems.update(wrong)
        if channel is not None and channel.message_id == "StatusEvent" and not wrong:
            StatusEvent.model_validate_json(seen.body)  # and the model subscribers decode with
    never = [f"never emitted: {gap}" for gap in contract.missing({"events", "billing", "dead"})]
    report = sorted(problems) + never
    assert not report, "\n".join(report)

    # Each job's story, as a subscriber reads it.
    assert found.statuses(ids[0]) == ["sent", "delivered"]
    assert found.statuses(ids[1]) == ["sent", "undelivered"]
    assert found.statuses(ids[2]) == ["failed"]
    assert found.statuses(ids[3])[0] == "unknown"
    assert found.statuses(ids[4]) == ["sent", "delivered"]
    held = [e["job_id"] for e in found.events() if e.get("status") == "held"
            and e["account"] == account]
    assert held and all(found.statuses(j) == ["held", "sent", "delivered"] for j in held)
    for event in found.events():
        if event.get("account") == account and "job_id" in event:
            assert event["metadata"] == {"order": event["job_id"]}, event
    assert any(s.routing_key == "topup.failed" and s.json()["account"] == declined
               for s in found.seen)
    broadcast_events(found, broadcast_id)
    dead_lettered(found, refused, refused_cancel)
    assert found.statuses(later) == ["scheduled", "canceled"]
    assert found.statuses(deferred) == ["deferred"]


def broadcast_events(found: Tap, broadcast_id: str) -> None:
    """Each recipient: kind broadcast, the broadcast's id and metadata, one final status."""
    events = [e for e in found.events() if e.get("broadcast_id") == broadcast_id]
    assert {e["kind"] for e in events} == {"broadcast"}
    assert all(e["metadata"] == {"campaign": "contract"} for e in events)
    stories: dict[str, list[str]] = {}
    reasons: dict[str, str | None] = {}
    for e in events:
        stories.setdefault(e["job_id"], []).append(e["status"])
        reasons[e["job_id"]] = e["reason"]
    assert sorted(stories) == [f"{broadcast_id}:{seq}" for seq in range(9)]
    assert sorted(map(tuple, stories.values())) == sorted(
        [("sent", "delivered")] * 3 + [("held", "canceled")] * 3 + [("skipped",)] * 3)
    assert sorted(reasons[f"{broadcast_id}:{seq}"] or "" for seq in (6, 7, 8)) == [
        "duplicate", "invalid", "opted_out"]


def dead_lettered(found: Tap, refused: list[str], refused_cancel: str) -> None:
    """Parked with its reason and properties unchanged; an event when id and account are read."""
    parked = [s for s in found.seen if s.source == "dead"]
    assert sorted(s.headers["x-reason"] for s in parked) == [
        "invalid_recipient", "not_json", "unknown_account", "unknown_account",
        "unknown_account"]
    for s in parked:
        if "x-job-id" in s.headers:  # published with the job id as message id: unchanged
            assert s.properties["message_id"] == s.headers["x-job-id"], s.headers
    events = {e["job_id"]: e for e in found.events() if e.get("status") == "dead_lettered"}
    assert (events.pop(refused_cancel)["kind"]) == "cancel"
    assert sorted(events) == sorted(refused)
    bad_to, call_id, broadcast_id = refused
    assert (events[bad_to]["kind"], events[bad_to]["reason"]) == ("sms", "invalid_recipient")
    assert events[bad_to]["metadata"] == {}  # an invalid job's metadata is not echoed
    assert (events[call_id]["kind"], events[call_id]["reason"]) == ("call", "unknown_account")
    assert events[broadcast_id]["broadcast_id"] == broadcast_id


def test_mandatory_is_what_the_relay_does() -> None:
    """Billing events are published mandatory, status and account events are not."""
    doc = load()
    for name, item in doc["channels"].items():
        op = item.get("subscribe")
        exchange = item["bindings"]["amqp"].get("exchange", {}).get("name", "")
        if op is None or not exchange:
            continue
        mandatory = op["bindings"]["amqp"]["mandatory"]
        assert mandatory == (exchange.removeprefix("dispatcher.") in MANDATORY_EXCHANGES), name


async def test_canceled_pending_recipients_get_events(pool: asyncpg.Pool) -> None:
    """Recipients a cancel drops before they became jobs get `canceled`, like held ones."""
    account = uid("acct")
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 2, "purchase", uid("pay"))
    job = parse_job(json.dumps({
        "schema_version": 1, "id": uid("bc"), "kind": "broadcast", "account": account,
        "from": SENDER, "body": "hi", "metadata": {"campaign": "c"},
        "recipients": [{"to": n} for n in numbers_of("US", 10)]}).encode())
    assert isinstance(job, BroadcastJob)
    rates = RateCache(pool)
    await Broadcasts(pool, rates).submit(job.id, job, refuse_if_short=False)

    async def send(_: bytes, __: int) -> Outcome:
        return Done("sent")
    runner = BroadcastRunner(pool, rates, send, batch=4, window=8)
    row = await pool.fetchrow("SELECT * FROM broadcasts WHERE id = $1", job.id)
    assert await runner.step(row)  # 2 sending (never claimed here), 2 held; 6 still pending
    await runner.drain(5.0)
    assert await cancel(pool, job.id) == "canceled"
    rows = await pool.fetch(
        "SELECT routing_key, body FROM outbox WHERE body->>'broadcast_id' = $1 ORDER BY id",
        job.id)
    events = [json.loads(r["body"]) for r in rows]
    assert all(r["routing_key"] == f"status.broadcast.{e['status']}"
               for r, e in zip(rows, events, strict=True))
    canceled = [e for e in events if e["status"] == "canceled"]
    # Unclaimed sending jobs are canceled too (their create never started).
    assert sorted(e["job_id"] for e in canceled) == sorted(
        f"{job.id}:{seq}" for seq in range(10))
    assert all(e["reason"] == "broadcast_canceled" and e["credits"] == 0
               and e["metadata"] == {"campaign": "c"} for e in canceled)
    held = [e["job_id"] for e in events if e["status"] == "held"]
    assert held == [f"{job.id}:2", f"{job.id}:3"]


async def test_delivery_limit_dead_letters_follow_the_document(settings: Settings) -> None:
    """A job the broker parks itself (its handler crashed too often) has no ``x-reason``: the
    document says what it has instead."""
    names = Names(uid("dl"))
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = await declare(channel, names, delivery_limit=1)
        try:
            await topology.jobs.publish(aio_pika.Message(
                b"{}", content_type="application/json", content_encoding="utf-8",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id="job-1", type="sms"),
                routing_key="sms.bulk")
            for _ in range(2):  # two deliveries that crash: over the limit of one
                message = await get(topology.work_queues["bulk"])
                await message.nack(requeue=True)
            dead = await get(await channel.get_queue(names.dead_queue))
            contract = Contract()
            channel_found, problems = contract.check(Seen.of(dead, names.prefix, source="dead"))
            assert channel_found is not None and channel_found.name == "dispatcher.dead"
            assert problems == []
            assert (dead.routing_key, dead.message_id, dead.type) == ("delivery_limit", "job-1",
                                                                      "sms")
        finally:
            await delete_all(channel, names)


async def get(queue: aio_pika.abc.AbstractQueue) -> AbstractIncomingMessage:
    for _ in range(100):
        message = await queue.get(fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing on {queue.name}")
