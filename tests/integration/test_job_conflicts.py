"""A reused job id with another job, and a job on a routing key not its own: dead-lettered.

The same id with the same job is a duplicate (nothing happens); the same id with a different job
is a publisher bug: dead-lettered ``job_id_conflict``, never sent, the first job untouched. A job
whose routing key (or work queue) disagrees with its kind or priority: ``routing_mismatch``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest

from dispatcher.broadcasts.runner import Broadcasts
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.rates import RateCache
from dispatcher.credits.subscriptions import create_account
from dispatcher.errors import JobIdConflict
from dispatcher.events.topology import Names
from dispatcher.jobs.contract import BroadcastJob, encode_job, parse_job
from dispatcher.jobs.store import JobStore, NewJob
from tests.integration.dispatcher_fixture import RunningDispatcher, wait_for


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def sms(job_id: str, account: str, **changes: Any) -> dict[str, Any]:
    return {"schema_version": 1, "id": job_id, "kind": "sms", "account": account,
            "to": "+14155550100", "from": "+14155550199", "body": "first", **changes}


def new_job(job: dict[str, Any]) -> NewJob:
    payload = encode_job(parse_job(json.dumps(job).encode())).decode()
    return NewJob(job["id"], job["account"], "sms", "transactional", payload, 1, "US", 1, 1)


async def funded(pool: asyncpg.Pool, credits: int = 10) -> str:
    account = uid("acct")
    await create_account(pool, account)
    await CreditStore(pool).grant(account, credits, "purchase", uid("pay"))
    return account


async def test_begin_tells_a_duplicate_from_another_job_under_the_same_id(
        pool: asyncpg.Pool) -> None:
    jobs = JobStore(pool)
    account = await funded(pool)
    job_id = uid("job")
    first = sms(job_id, account, created_at="2026-12-01T10:00:00+00:00")
    assert (await jobs.begin(new_job(first))).outcome == "send"
    before = dict(await pool.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id))
    # Republished (the helper stamps a new created_at; priority now explicit): a duplicate.
    again = {**first, "created_at": "2026-12-01T10:00:05+00:00", "priority": "transactional"}
    assert (await jobs.begin(new_job(again))).outcome == "duplicate"
    for other in (sms(job_id, account, body="second"), sms(job_id, account, to="+14155550101"),
                  sms(job_id, account, metadata={"order": "2"}),
                  sms(job_id, account, priority="bulk")):
        assert (await jobs.begin(new_job(other))).outcome == "conflict"
    # A job waiting to retry after a 429 is resumed by its own redelivery only.
    await pool.execute("UPDATE jobs SET status = 'retry_wait' WHERE job_id = $1", job_id)
    assert (await jobs.begin(new_job(sms(job_id, account, body="second")))).outcome == "conflict"
    assert await pool.fetchval("SELECT status FROM jobs WHERE job_id = $1", job_id) == "retry_wait"
    assert (await jobs.begin(new_job(again))).outcome == "send"
    after = dict(await pool.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id))
    assert (after["payload"], after["account_id"]) == (before["payload"], account)
    assert (await CreditStore(pool).balance(account)).reserved == 1


def broadcast(job_id: str, account: str, **changes: Any) -> BroadcastJob:
    job = parse_job(json.dumps({
        "schema_version": 1, "id": job_id, "kind": "broadcast", "account": account,
        "from": "+14155550199", "body": "Hi {name}",
        "recipients": [{"to": "+14155550100", "vars": {"name": "Ann"}},
                       {"to": "+14155550101", "vars": {"name": "Bo"}}], **changes}).encode())
    assert isinstance(job, BroadcastJob)
    return job


async def test_a_reused_broadcast_id_with_another_broadcast_is_a_conflict(
        pool: asyncpg.Pool) -> None:
    broadcasts = Broadcasts(pool, RateCache(pool))
    account, other_account = await funded(pool), await funded(pool)
    job_id = uid("bc")
    first = broadcast(job_id, account)
    assert (await broadcasts.submit(job_id, first, refuse_if_short=False))[1] is True
    stamped = first.model_copy(update={"created_at": datetime.now(UTC) + timedelta(seconds=5)})
    assert (await broadcasts.submit(job_id, stamped, refuse_if_short=False))[1] is False
    for other in (broadcast(job_id, account, body="Bye {name}"),
                  broadcast(job_id, account, recipients=[{"to": "+14155550100",
                                                          "vars": {"name": "Ann"}}]),
                  broadcast(job_id, other_account)):
        with pytest.raises(JobIdConflict):
            await broadcasts.submit(job_id, other, refuse_if_short=False)
    row = await pool.fetchrow("SELECT account_id, body, total FROM broadcasts WHERE id = $1",
                              job_id)
    assert tuple(row) == (account, "Hi {name}", 2)


async def publish_raw(d: RunningDispatcher, job: dict[str, Any], routing_key: str) -> None:
    connection = await aio_pika.connect(d.settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(Names(d.settings.amqp_prefix).jobs_exchange)
        await exchange.publish(aio_pika.Message(json.dumps(job).encode(), message_id=job["id"],
                                                type=job["kind"]), routing_key=routing_key)


async def dead_letters(d: RunningDispatcher, count: int) -> list[aio_pika.abc.AbstractMessage]:
    connection = await aio_pika.connect(d.settings.amqp_url)
    found: list[aio_pika.abc.AbstractMessage] = []
    async with connection:
        channel = await connection.channel()
        dead = await channel.get_queue(Names(d.settings.amqp_prefix).dead_queue)
        for _ in range(400):
            message = await dead.get(fail=False)
            if message is not None:
                await message.ack()
                found.append(message)
                if len(found) == count:
                    break
            else:
                await asyncio.sleep(0.05)
    return found


def dead_lettered(d: RunningDispatcher, reason: str) -> float:
    value = d.service.metrics.registry.get_sample_value(
        "dispatcher_dead_letters_total", {"reason": reason})
    return value or 0.0


async def test_a_reused_job_id_is_dead_lettered_never_sent_and_the_first_job_kept(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 10)
    job_id = uid("reused")
    await d.publish_sms(job_id, account, to="+14155550142", body="first")

    async def delivered() -> bool:
        job = await d.job(job_id)
        return job is not None and job["status"] == "delivered"
    await wait_for(delivered)
    first = await d.job(job_id)
    await d.publish_sms(job_id, account, to="+14155550143", body="second")
    [letter] = await dead_letters(d, 1)
    assert (letter.headers["x-reason"], letter.headers["x-job-id"]) == (
        "job_id_conflict", job_id)
    assert json.loads(letter.body)["body"] == "second"
    assert dead_lettered(d, "job_id_conflict") == 1
    assert d.sandbox.state.count(to="+14155550143") == 0
    assert d.sandbox.state.count(to="+14155550142") == 1
    assert await d.job(job_id) == first
    # The same job again (a new created_at stamp): a duplicate, acked and not dead-lettered.
    await d.publish_sms(job_id, account, to="+14155550142", body="first")
    await publish_raw(d, sms(uid("marker"), account, to="+14155550144", priority="bulk"),
                      "sms.bulk")

    async def marker_sent() -> bool:
        return d.sandbox.state.count(to="+14155550144") == 1
    await wait_for(marker_sent)
    assert dead_lettered(d, "job_id_conflict") == 1
    assert d.sandbox.state.count(to="+14155550142") == 1


@pytest.mark.parametrize(("changes", "routing_key"), [
    ({"priority": "bulk"}, "sms.transactional"),  # lands on the transactional queue
    ({}, "call.transactional"),  # another kind's key, right queue
    ({"priority": "transactional"}, "sms.bulk"),
    ({"priority": "bulk"}, "broadcast.bulk"),
])
async def test_a_job_on_a_routing_key_not_its_own_is_dead_lettered(
        dispatcher: RunningDispatcher, changes: dict[str, str], routing_key: str) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 10)
    job = sms(uid("misrouted"), account, to="+14155550150", **changes)
    await publish_raw(d, job, routing_key)
    [letter] = await dead_letters(d, 1)
    assert (letter.headers["x-reason"], letter.headers["x-job-id"]) == (
        "routing_mismatch", job["id"])
    assert dead_lettered(d, "routing_mismatch") == 1
    assert await d.job(job["id"]) is None
    assert d.sandbox.state.count(to="+14155550150") == 0
    assert (await CreditStore(d.pool).balance(account)).available == 10
