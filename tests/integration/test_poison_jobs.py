"""Poison jobs end on the dead-letter queue with a reason, counted; none takes a hot loop.

A body with ``\\u0000`` or a lone surrogate used to pass validation and be refused by
PostgreSQL: the handler crashed, the message was requeued at once, burned its deliveries in
moments and RabbitMQ dead-lettered it without ``x-reason``, uncounted. Duplicate keys were read
last-wins, so a different account than an upstream validator saw was charged.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import CollectorRegistry

from dispatcher.dispatch.consumer import Consumer
from dispatcher.events.topology import Names, delete_all
from dispatcher.jobs.contract import Arrival
from dispatcher.jobs.outcomes import Outcome
from dispatcher.metrics import Metrics
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import RunningDispatcher, wait_for


def sms_body(job_id: str, account: str, tail: bytes) -> bytes:
    return (b'{"schema_version": 1, "id": "' + job_id.encode() + b'", "kind": "sms", '
            b'"account": "' + account.encode() + b'", "from": "+14155550199", '
            b'"to": "+14155550100", ' + tail + b"}")


async def publish_raw(amqp_url: str, names: Names, bodies: list[bytes]) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.jobs_exchange)
        for body in bodies:
            await exchange.publish(aio_pika.Message(body, type="sms"),
                                   routing_key="sms.transactional")


async def dead_letters(amqp_url: str, names: Names, expected: int,
                       timeout: float = 30.0) -> list[AbstractIncomingMessage]:
    """Take ``expected`` messages off the dead-letter queue (waiting for them)."""
    found: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(names.dead_queue)

        async def collected() -> bool:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                found.append(message)
            return len(found) >= expected
        await wait_for(collected, timeout=timeout)
        await asyncio.sleep(0.5)
        extra = await queue.get(no_ack=True, fail=False)
        assert extra is None, f"more dead letters than expected: {extra.headers}"
    return found


def counted(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("dispatcher_dead_letters_total",
                                             {"reason": reason}) or 0.0


async def test_unstorable_text_and_duplicate_keys_are_dead_lettered_with_reasons(
        dispatcher: RunningDispatcher) -> None:
    account = await dispatcher.funded_account(f"poison-{uuid.uuid4().hex[:6]}", 100)
    other = await dispatcher.funded_account(f"victim-{uuid.uuid4().hex[:6]}", 100)
    names = Names(dispatcher.settings.amqp_prefix)
    await publish_raw(dispatcher.settings.amqp_url, names, [
        sms_body("nul-1", account, rb'"body": "a\u0000b"'),
        sms_body("surrogate-1", account, rb'"body": "\ud800"'),
        sms_body("dup-1", account, b'"body": "hi", "account": "' + other.encode() + b'"'),
        sms_body("huge-1", account, b'"body": "' + b"x" * 5_000_000 + b'"'),  # 5 MB
        sms_body("ok-1", account, b'"body": "fine"'),
    ])
    letters = await dead_letters(dispatcher.settings.amqp_url, names, 4)
    reasons = {(m.headers or {}).get("x-job-id"): (m.headers or {}).get("x-reason")
               for m in letters}
    assert reasons == {"nul-1": "invalid_text", "surrogate-1": "invalid_text",
                       "dup-1": "duplicate_key", "huge-1": "too_large"}
    metrics = dispatcher.service.metrics
    assert (counted(metrics, "invalid_text"), counted(metrics, "duplicate_key")) == (2, 1)
    assert counted(metrics, "delivery_limit") == 0

    async def valid_one_sent() -> bool:
        job = await dispatcher.job("ok-1")
        return job is not None and job["status"] in ("sent", "delivered")
    await wait_for(valid_one_sent)
    assert await dispatcher.pool.fetchval(
        "SELECT count(*) FROM jobs WHERE account_id = $1", other) == 0


async def run_consumer(handle: Callable[[bytes], Awaitable[Outcome]], delivery_limit: int,
                       bodies: list[bytes], expected_dead: int
                       ) -> tuple[list[AbstractIncomingMessage], Metrics]:
    settings = replace(Settings(), amqp_prefix=f"crash{uuid.uuid4().hex[:8]}")
    names, metrics = Names(settings.amqp_prefix), Metrics(CollectorRegistry())
    connection = await aio_pika.connect_robust(settings.amqp_url)
    consumer = Consumer(connection, names, handle, metrics, prefetch=10, workers=2,
                        delivery_limit=delivery_limit)
    try:
        await consumer.start()
        await publish_raw(settings.amqp_url, names, bodies)
        letters = await dead_letters(settings.amqp_url, names, expected_dead, timeout=60)
        await consumer.stop(drain_timeout=5)
        return letters, metrics
    finally:
        channel = await connection.channel()
        await delete_all(channel, names)
        await connection.close()


async def test_a_crashing_handler_is_retried_with_delays_then_dead_lettered_with_a_reason(
        ) -> None:
    tries: list[float] = []

    async def handle(body: bytes, _: Arrival) -> Outcome:
        tries.append(asyncio.get_running_loop().time())
        raise RuntimeError("a bug")

    letters, metrics = await run_consumer(handle, 3, [sms_body("bug-1", "acme", b'"body": "x"')],
                                          1)
    headers = letters[0].headers or {}
    assert (headers.get("x-reason"), headers.get("x-job-id"), headers.get("x-account")) == (
        "delivery_limit", "bug-1", "acme")
    assert counted(metrics, "delivery_limit") == 1
    # Three tries, the delivery limit, each after a delay (1 s, then 5 s): never a hot loop.
    assert len(tries) == 3
    assert tries[1] - tries[0] >= 0.9 and tries[2] - tries[1] >= 4.5
