"""Against real RabbitMQ: coalesced acks cover only committed outcomes, around requeued crashes.

If a multiple-ack covered a delivery still in flight, its later nack would name an unknown
delivery tag and the broker would close the channel: the crashed jobs would never come back and
the run would stall. Every job must end handled exactly once, the queues empty, with fewer ack
frames than jobs.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from dataclasses import replace

import aio_pika
from prometheus_client import CollectorRegistry

from dispatcher.dispatch.consumer import Consumer
from dispatcher.events.topology import Names, delete_all
from dispatcher.jobs.contract import Arrival
from dispatcher.jobs.outcomes import Done, Outcome
from dispatcher.metrics import Metrics
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import wait_for

JOBS = 300


async def test_coalesced_acks_survive_out_of_order_finishes_and_requeues() -> None:
    settings = replace(Settings(), amqp_prefix=f"acks{uuid.uuid4().hex[:8]}")
    names = Names(settings.amqp_prefix)
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

    connection = await aio_pika.connect_robust(settings.amqp_url)
    consumer = Consumer(connection, names, handle, Metrics(CollectorRegistry()), prefetch=50,
                        workers=20, delivery_limit=10)
    try:
        await consumer.start()
        publish_channel = await connection.channel(publisher_confirms=True)
        jobs = await publish_channel.get_exchange(names.jobs_exchange)
        for i in range(JOBS):
            priority = "transactional" if i % 3 == 0 else "bulk"
            await jobs.publish(aio_pika.Message(f"job-{i}".encode(), type="sms"),
                               routing_key=f"sms.{priority}")

        async def all_done() -> bool:
            return len(done) == JOBS
        await wait_for(all_done, timeout=60)
        await consumer.stop(drain_timeout=5)
        assert set(done.values()) == {1}
        assert all(attempts[body] == 2 for body in crash_once)
        assert consumer.ack_frames < JOBS - len(crash_once)
        check = await connection.channel()
        for priority in ("transactional", "bulk"):
            queue = await check.declare_queue(names.work_queue(priority), passive=True)
            assert queue.declaration_result.message_count == 0
    finally:
        channel = await connection.channel()
        await delete_all(channel, names)
        await connection.close()
