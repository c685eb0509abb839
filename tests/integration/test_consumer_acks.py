"""Against real RabbitMQ: each delivery is acked once its outcome is committed, around requeued
crashes, and an ack on a channel that died never takes the consumer down.

A crashed job is nacked back to the queue and handled again; every job ends handled exactly once
with the queues empty. When the consume channel dies under a job in flight, that job's ack fails
(logged): the robust channel comes back, the broker redelivers the job, and the consumer goes on.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import aio_pika
import pytest
import structlog
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry

from dispatcher.dispatch.consumer import Consumer
from dispatcher.events.topology import Names, delete_all
from dispatcher.jobs.contract import Arrival
from dispatcher.jobs.outcomes import Done, Outcome
from dispatcher.metrics import Metrics
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import wait_for

JOBS = 300


@pytest.fixture
async def broker() -> AsyncIterator[tuple[AbstractRobustConnection, Names]]:
    settings = replace(Settings(), amqp_prefix=f"acks{uuid.uuid4().hex[:8]}")
    names = Names(settings.amqp_prefix)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    try:
        yield connection, names
    finally:
        channel = await connection.channel()
        await delete_all(channel, names)
        await connection.close()


async def publish(connection: AbstractRobustConnection, names: Names, body: bytes,
                  priority: str = "bulk") -> None:
    channel = await connection.channel(publisher_confirms=True)
    jobs = await channel.get_exchange(names.jobs_exchange)
    await jobs.publish(aio_pika.Message(body, type="sms"), routing_key=f"sms.{priority}")
    await channel.close()


async def assert_queues_empty(connection: AbstractRobustConnection, names: Names) -> None:
    check = await connection.channel()
    for priority in ("transactional", "bulk"):
        queue = await check.declare_queue(names.work_queue(priority), passive=True)
        assert queue.declaration_result.message_count == 0
    await check.close()


async def test_every_job_is_acked_once_around_out_of_order_finishes_and_requeues(
        broker: tuple[AbstractRobustConnection, Names]) -> None:
    connection, names = broker
    rng = random.Random(7)
    crash_once = {f"job-{i}".encode() for i in rng.sample(range(JOBS), 15)}
    attempts: Counter[bytes] = Counter()
    done: Counter[bytes] = Counter()

    async def handle(body: bytes, _: Arrival) -> Outcome:
        attempts[body] += 1
        await asyncio.sleep(rng.random() * 0.01)  # finishes out of delivery order
        if body in crash_once and attempts[body] == 1:
            raise RuntimeError("crash: requeued")
        done[body] += 1
        return Done("sent")

    consumer = Consumer(connection, names, handle, Metrics(CollectorRegistry()), prefetch=50,
                        workers=20, delivery_limit=10)
    await consumer.start()
    for i in range(JOBS):
        await publish(connection, names, f"job-{i}".encode(),
                      "transactional" if i % 3 == 0 else "bulk")

    async def all_done() -> bool:
        return len(done) == JOBS
    await wait_for(all_done, timeout=60)
    await consumer.stop(drain_timeout=5)
    assert set(done.values()) == {1}
    assert all(attempts[body] == 2 for body in crash_once)
    await assert_queues_empty(connection, names)


async def test_an_ack_on_a_dead_channel_is_survived_and_the_job_comes_back(
        broker: tuple[AbstractRobustConnection, Names]) -> None:
    connection, names = broker
    entered, release = asyncio.Event(), asyncio.Event()
    seen: list[tuple[bytes, int]] = []

    async def handle(body: bytes, _: Arrival) -> Outcome:
        seen.append((body, len([b for b, _ in seen if b == body]) + 1))
        if body == b"slow" and len(seen) == 1:
            entered.set()
            await release.wait()
        return Done("sent")

    consumer = Consumer(connection, names, handle, Metrics(CollectorRegistry()), prefetch=10,
                        workers=4, delivery_limit=10)
    await consumer.start()
    await publish(connection, names, b"slow")
    await asyncio.wait_for(entered.wait(), 10)
    # The broker closes the consume channel (406: an unknown delivery tag) under the job.
    channel = consumer._consume_channel
    assert channel is not None
    underlay = await channel.get_underlay_channel()
    await underlay.basic_ack(delivery_tag=10_000_000)
    await wait_for(_closed(underlay), timeout=10)
    with structlog.testing.capture_logs() as logs:
        release.set()  # its ack now goes to a dead channel
        await wait_for(_logged(logs, "ack_failed"), timeout=10)

    async def redelivered() -> bool:
        return (b"slow", 2) in seen
    await wait_for(redelivered, timeout=30)
    await publish(connection, names, b"after")

    async def after_done() -> bool:
        return any(body == b"after" for body, _ in seen)
    await wait_for(after_done, timeout=30)
    await consumer.stop(drain_timeout=5)
    await assert_queues_empty(connection, names)


def _closed(underlay: object) -> Callable[[], Awaitable[bool]]:
    async def closed() -> bool:
        return bool(getattr(underlay, "is_closed", False))
    return closed


def _logged(logs: list[dict[str, object]], event: str) -> Callable[[], Awaitable[bool]]:
    async def logged() -> bool:
        return any(entry["event"] == event for entry in logs)
    return logged
