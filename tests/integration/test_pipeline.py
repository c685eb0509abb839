"""Jobs from RabbitMQ to the sandbox and back: reserve, send once, settle to the real cost."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid

import aio_pika
import aiohttp
import asyncpg
import pytest
from twilio.request_validator import RequestValidator

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.events.topology import Names
from dispatcher.jobs.contract import Arrival, StatusEvent
from dispatcher.sandbox.state import NumberRule
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import (
    RunningDispatcher,
    running_dispatcher,
    wait_for,
)
from tests.integration.sandbox_fixture import SandboxHandle


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def status_of(d: RunningDispatcher, job_id: str) -> str | None:
    job = await d.job(job_id)
    return None if job is None else str(job["status"])


async def wait_status(d: RunningDispatcher, job_id: str, *statuses: str) -> dict[str, object]:
    async def reached() -> bool:
        return await status_of(d, job_id) in statuses
    reached.__qualname__ = f"job {job_id} reaches {statuses}"
    await wait_for(reached)
    job = await d.job(job_id)
    assert job is not None
    return job


async def test_sms_is_sent_once_and_settled_to_the_real_cost(dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 10)
    body = "x" * 200  # two GSM-7 segments
    await d.publish_sms("sms-1-" + account, account, body=body)
    job = await wait_status(d, "sms-1-" + account, "delivered")
    assert job["final_cost"] == 2 and job["units"] == 2
    assert str(job["provider_sid"]).startswith("SM")
    balance = await CreditStore(d.pool).balance(account)
    assert (balance.available, balance.reserved) == (8, 0)
    assert d.sandbox.state.count(to="+14155550100", accepted=True) >= 1
    assert await run_audit(d.pool) == []


async def test_call_reserves_max_minutes_and_settles_real_duration(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 20)
    d.sandbox.state.set_rule("+14155550111", NumberRule(call_duration_s=61))
    job_id = uid("call")
    await d.publisher.publish({"schema_version": 1, "id": job_id, "kind": "call",
                               "account": account, "to": "+14155550111",
                               "from": "+14155550199", "twiml": "<Response/>",
                               "max_minutes": 5})
    job = await wait_status(d, job_id, "delivered")
    # Default call rate is 2 credits a minute: 10 reserved, 61 s billed as 2 minutes.
    assert job["estimate"] == 10 and job["final_cost"] == 4
    [create] = d.sandbox.state.creates(to="+14155550111", accepted=True)
    assert create.time_limit == 300
    assert (await CreditStore(d.pool).balance(account)).available == 16


async def test_the_same_job_id_twice_sends_once_and_charges_once(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 10)
    job_id = uid("dup")
    to = "+14155550122"
    await d.publish_sms(job_id, account, to=to)
    await d.publish_sms(job_id, account, to=to)
    await wait_status(d, job_id, "delivered")
    await d.sandbox.wait_callbacks()
    assert d.sandbox.state.count(to=to) == 1
    assert (await CreditStore(d.pool).balance(account)).available == 9


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\xff\xfe not utf8", "not_utf8"),
    (b"{not json", "not_json"),
    (b'{"schema_version": 2, "id": "p1", "kind": "sms"}', "unsupported_version"),
    (b'{"schema_version": 1, "id": "p2", "kind": "fax", "account": "a"}', "unknown_kind"),
    (json.dumps({"schema_version": 1, "id": "p3", "kind": "sms", "account": "a",
                 "to": "+1555", "from": "+14155550199", "body": "x"}).encode(),
     "invalid_recipient"),
    (json.dumps({"schema_version": 1, "id": "p4", "kind": "call", "account": "a",
                 "to": "+14155550100", "from": "+14155550199", "max_minutes": 0,
                 "twiml": "<Response/>"}).encode(), "invalid_field"),
    (b"{" + b" " * 300_000 + b"}", "too_large"),
    (json.dumps({"schema_version": 1, "id": "p5", "kind": "sms", "account": "nobody-here",
                 "to": "+14155550100", "from": "+14155550199", "body": "x"}).encode(),
     "unknown_account"),
])
async def test_poison_jobs_are_dead_lettered_with_their_reason(
        dispatcher: RunningDispatcher, payload: bytes, reason: str) -> None:
    d = dispatcher
    names = Names(d.settings.amqp_prefix)
    connection = await aio_pika.connect(d.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(names.jobs_exchange)
        await exchange.publish(aio_pika.Message(payload, message_id=uid("poison")),
                               routing_key="sms.transactional")
        dead = await channel.get_queue(names.dead_queue)
        message = None
        for _ in range(200):
            message = await dead.get(fail=False)
            if message is not None:
                break
            await asyncio.sleep(0.05)
        assert message is not None, "nothing reached the dead-letter queue"
        await message.ack()
        assert message.headers["x-reason"] == reason
        assert message.body == payload
    # The consumer is still alive: a good job goes through.
    account = await d.funded_account(uid("acct"), 5)
    await d.publish_sms(uid("after-poison"), account)
    await wait_for(lambda: _any_delivered(d, account))


async def _any_delivered(d: RunningDispatcher, account: str) -> bool:
    return bool(await d.pool.fetchval(
        "SELECT count(*) FROM jobs WHERE account_id = $1 AND status = 'delivered'", account))


async def test_rate_limited_twice_then_sent(dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    to = "+14155550133"
    d.sandbox.state.set_rule(to, NumberRule(error_code=20429, fail_times=2))
    account = await d.funded_account(uid("acct"), 10)
    job_id = uid("rl")
    await d.publish_sms(job_id, account, to=to)
    job = await wait_status(d, job_id, "delivered")
    assert d.sandbox.state.count(to=to) == 3
    assert d.sandbox.state.count(to=to, accepted=True) == 1
    assert job["attempts"] == 3
    assert (await CreditStore(d.pool).balance(account)).available == 9


@pytest.mark.parametrize("code", [21211, 21610])
async def test_permanent_errors_fail_the_job_and_release_credits(
        dispatcher: RunningDispatcher, code: int) -> None:
    d = dispatcher
    to = f"+1415555{code % 10000:04d}"
    d.sandbox.state.set_rule(to, NumberRule(error_code=code))
    account = await d.funded_account(uid("acct"), 10)
    job_id = uid("perm")
    await d.publish_sms(job_id, account, to=to)
    job = await wait_status(d, job_id, "failed")
    assert job["error_code"] == code
    assert job["final_cost"] == 0
    balance = await CreditStore(d.pool).balance(account)
    assert (balance.available, balance.reserved) == (10, 0)
    assert await run_audit(d.pool) == []


async def test_500_after_accept_is_unknown_then_resolved_by_the_callback(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    to = "+14155550144"
    d.sandbox.state.set_rule(to, NumberRule(accept_then_500=True))
    account = await d.funded_account(uid("acct"), 10)
    job_id = uid("u500")
    await d.publish_sms(job_id, account, to=to)
    job = await wait_status(d, job_id, "delivered")
    assert job["provider_sid"] is not None
    assert d.sandbox.state.count(to=to) == 1
    assert (await CreditStore(d.pool).balance(account)).available == 9
    events = await d.pool.fetch(
        "SELECT body->>'status' AS s FROM outbox WHERE body->>'job_id' = $1 ORDER BY id", job_id)
    assert [e["s"] for e in events][:1] == ["unknown"]


async def test_forged_callback_is_refused_and_changes_nothing(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 10)
    d.sandbox.state.configure(callbacks_enabled=False)
    job_id = uid("forge")
    await d.publish_sms(job_id, account)
    await wait_status(d, job_id, "sent")
    url = f"{d.settings.public_base_url}/twilio/status/{job_id}"
    params = {"MessageSid": "SMforged", "MessageStatus": "delivered", "NumSegments": "9"}
    forged = RequestValidator("not-the-token").compute_signature(url, params)
    async with aiohttp.ClientSession() as http:
        response = await http.post(url, data=params, headers={"X-Twilio-Signature": forged})
        assert response.status == 403
        response = await http.post(url, data=params)
        assert response.status == 403
        good = RequestValidator(d.settings.twilio_auth_token).compute_signature(url, params)
        job = await d.job(job_id)
        assert job is not None and job["status"] == "sent" and job["final_cost"] is None
        params["MessageSid"] = job["provider_sid"]
        good = RequestValidator(d.settings.twilio_auth_token).compute_signature(url, params)
        response = await http.post(url, data=params, headers={"X-Twilio-Signature": good})
        assert response.status == 204
    job = await d.job(job_id)
    assert job is not None and job["status"] == "delivered" and job["final_cost"] == 9


async def test_a_job_whose_handling_keeps_crashing_is_dead_lettered_alone(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    # Crashes are retried after 1 s, then 5 s: the third failure reaches the limit.
    async with running_dispatcher(settings, twilio_sandbox, pool, delivery_limit=3) as d:
        await _crashing_job_is_dead_lettered_alone(d)


async def _crashing_job_is_dead_lettered_alone(d: RunningDispatcher) -> None:
    consumer = d.service.consumer
    assert consumer is not None
    real_handle = consumer._handle
    cursed = uid("cursed")

    async def crash_on_cursed(raw: bytes, arrival: Arrival):  # type: ignore[no-untyped-def]
        if cursed.encode() in raw:
            raise RuntimeError("boom")
        return await real_handle(raw, arrival)

    consumer._handle = crash_on_cursed
    account = await d.funded_account(uid("acct"), 10)
    await d.publish_sms(cursed, account)
    neighbour = uid("neighbour")
    await d.publish_sms(neighbour, account)
    await wait_status(d, neighbour, "delivered")
    names = Names(d.settings.amqp_prefix)
    connection = await aio_pika.connect(d.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.get_queue(names.dead_queue)

        async def dead_lettered() -> bool:
            message = await dead.get(fail=False)
            if message is None:
                return False
            await message.ack()
            # Dead-lettered by us, with its reason (not dropped by the broker without one).
            return cursed.encode() in message.body and (message.headers or {}).get(
                "x-reason") == "delivery_limit"
        await wait_for(dead_lettered, timeout=30)
    assert await d.job(cursed) is None
    assert d.service.metrics.registry.get_sample_value(
        "dispatcher_dead_letters_total", {"reason": "delivery_limit"}) == 1


async def test_each_send_carries_a_status_callback_url_with_its_job_id(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 5)
    job_id = uid("cb")
    await d.publish_sms(job_id, account, to="+14155550155")
    await wait_status(d, job_id, "sent", "delivered")
    [create] = d.sandbox.state.creates(to="+14155550155")
    assert create.status_callback == f"{d.settings.public_base_url}/twilio/status/{job_id}"


async def test_a_redelivered_job_that_is_already_settled_is_acked_without_sending(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 5)
    job_id = uid("redeliver")
    to = "+14155550166"
    await d.publish_sms(job_id, account, to=to)
    await wait_status(d, job_id, "delivered")
    before = await d.job(job_id)
    names = Names(d.settings.amqp_prefix)
    connection = await aio_pika.connect(d.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(names.jobs_exchange)
        body = json.dumps({"schema_version": 1, "id": job_id, "kind": "sms", "account": account,
                           "to": to, "from": "+14155550199", "body": "hello"}).encode()
        # What the broker hands back after a lost ack: the same message, flagged redelivered.
        await exchange.publish(aio_pika.Message(body, message_id=job_id, type="sms",
                                                headers={"x-redelivered-by-test": "1"}),
                               routing_key="sms.transactional")

        async def settled_by_the_consumer() -> bool:
            queue = await channel.declare_queue(names.work_queue("transactional"), passive=True)
            return queue.declaration_result.message_count == 0 and not (
                d.service.consumer and d.service.consumer._in_flight)
        await wait_for(settled_by_the_consumer)
        dead = await channel.get_queue(names.dead_queue)
        assert await dead.get(fail=False) is None
    await asyncio.sleep(0.2)
    assert d.sandbox.state.count(to=to) == 1
    assert await d.job(job_id) == before
    assert (await CreditStore(d.pool).balance(account)).available == 4


async def test_jobs_unresolved_lists_a_job_whose_outcome_is_unknown(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    to = "+14155550177"
    d.sandbox.state.configure(callbacks_enabled=False)
    d.sandbox.state.set_rule(to, NumberRule(accept_then_500=True))
    account = await d.funded_account(uid("acct"), 5)
    job_id = uid("unres")
    await d.publish_sms(job_id, account, to=to)
    await wait_status(d, job_id, "unknown")
    env = {**os.environ, "DISPATCHER_DATABASE_URL": d.settings.database_url,
           "DISPATCHER_LOG_LEVEL": "warning"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher", "jobs", "unresolved", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    [line] = [x for x in out.decode().splitlines() if x.startswith(job_id)]
    assert line.split("\t")[1:4] == [account, "sms", "unknown"]
    assert to not in out.decode(), "no phone numbers in operator output"


async def test_each_sender_is_paced_by_its_own_rate_limit(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    rate, jobs = 4.0, 10
    async with running_dispatcher(settings, twilio_sandbox, pool,
                                  sender_rate_per_second=rate) as d:
        account = await d.funded_account(uid("acct"), 100)
        slow, other = "+14155550198", "+14155550197"
        for i in range(jobs):
            await d.publisher.publish({"schema_version": 1, "id": uid(f"paced{i}"),
                                       "kind": "sms", "account": account, "from": slow,
                                       "to": f"+1415555{1000 + i}", "body": "paced"})
        # Another account's sender (an account's own jobs keep their arrival order).
        other_account = await d.funded_account(uid("acct"), 100)
        await d.publisher.publish({"schema_version": 1, "id": uid("other"), "kind": "sms",
                                   "account": other_account, "from": other,
                                   "to": "+14155552000", "body": "not paced"})

        async def all_sent() -> bool:
            return twilio_sandbox.state.count() == jobs + 1
        await wait_for(all_sent, timeout=30)
        times = sorted(r.received_at for r in twilio_sandbox.state.creates()
                       if r.from_ == slow)
        # A burst of `rate`, then one every 1/rate seconds: never faster than the limit.
        span = (times[-1] - times[0]).total_seconds()
        assert span >= (jobs - rate - 1) / rate, span
        [other_create] = [r for r in twilio_sandbox.state.creates() if r.from_ == other]
        assert other_create.received_at < times[-1], "another sender waited for this one"


async def test_status_events_reach_the_events_exchange_with_the_metadata_echoed(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    names = Names(d.settings.amqp_prefix)
    connection = await aio_pika.connect(d.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        events = await channel.declare_queue(exclusive=True, auto_delete=True)
        await events.bind(names.events_exchange, routing_key="status.#")
        account = await d.funded_account(uid("acct"), 5)
        job_id = uid("events")
        await d.publish_sms(job_id, account, to="+14155550188", metadata={"order": "A-1"})
        await wait_status(d, job_id, "delivered")
        seen: dict[str, dict[str, object]] = {}

        async def sent_and_delivered_seen() -> bool:
            message = await events.get(fail=False)
            if message is not None:
                await message.ack()
                event = json.loads(message.body)
                if event["job_id"] == job_id:
                    # The documented key, and one id to deduplicate by, whichever one reads.
                    parsed = StatusEvent.model_validate_json(message.body)
                    assert message.routing_key == parsed.routing_key
                    assert message.message_id == event["event_id"]
                    seen[str(message.routing_key)] = event
            return {"status.sms.sent", "status.sms.delivered"} <= set(seen)
        await wait_for(sent_and_delivered_seen)
    for key in ("status.sms.sent", "status.sms.delivered"):
        assert seen[key]["metadata"] == {"order": "A-1"}
        assert seen[key]["account"] == account
        assert seen[key]["status"] == key.removeprefix("status.sms.")
