"""A billing event nobody can receive yet is kept and retried, never dropped as published.

Against real RabbitMQ: with no queue bound to the billing exchange the broker returns the
(mandatory) balance.low; the row stays unpublished, due again after a backoff, and status events
behind it still flow. Once a queue is bound, the retry delivers it, exactly once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import asyncpg
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from prometheus_client import CollectorRegistry

from dispatcher.events import outbox
from dispatcher.events.outbox import OutboxRelay
from dispatcher.events.topology import Names, Topology, declare
from dispatcher.metrics import Metrics
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import drop_topology, wait_for


@dataclass
class Broker:
    connection: AbstractRobustConnection
    channel: AbstractChannel
    topology: Topology

    @property
    def exchanges(self) -> dict[str, aio_pika.abc.AbstractExchange]:
        return {"events": self.topology.events, "billing": self.topology.billing}


@pytest_asyncio.fixture
async def broker(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Broker]:
    """The dispatcher's exchanges on a confirming channel, with nothing bound to billing."""
    await pool.execute("UPDATE outbox SET published_at = now() WHERE published_at IS NULL")
    connection = await aio_pika.connect_robust(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        yield Broker(connection, channel, await declare(channel, Names(settings.amqp_prefix), 5))
    finally:
        await connection.close()
        await drop_topology(settings)


async def write(pool: asyncpg.Pool, exchange: str, routing_key: str) -> uuid.UUID:
    event_id = uuid.uuid4()
    await pool.execute("INSERT INTO outbox (event_id, exchange, routing_key, body) "
                       "VALUES ($1, $2, $3, $4::jsonb)", event_id, exchange, routing_key,
                       json.dumps({"event_id": str(event_id), "type": routing_key}))
    return event_id


async def row(pool: asyncpg.Pool, event_id: uuid.UUID) -> asyncpg.Record:
    found = await pool.fetchrow("SELECT published_at, attempts, next_attempt_at > now() AS later "
                                "FROM outbox WHERE event_id = $1", event_id)
    assert found is not None
    return found


def sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None
    return value


async def test_a_returned_billing_event_stays_unpublished_and_status_events_still_flow(
        pool: asyncpg.Pool, broker: Broker) -> None:
    low = await write(pool, "billing", "balance.low")
    status = await write(pool, "events", "status.sms.sent")
    metrics = Metrics(CollectorRegistry())
    relay = OutboxRelay(pool, broker.exchanges, metrics)

    assert await relay.relay_once() == 1  # the billing row, claimed first and returned
    returned = await row(pool, low)
    assert returned["published_at"] is None and returned["attempts"] == 1 and returned["later"]
    assert await relay.relay_once() == 1  # not claimed again: the status event goes
    assert (await row(pool, status))["published_at"] is not None
    assert await relay.relay_once() == 0  # nothing due: the relay does not spin on it
    assert sample(metrics, "dispatcher_outbox_returned_total") == 1
    assert metrics.registry.get_sample_value(
        "dispatcher_low_balance_events_total", {"type": "balance_low"}) == 0
    await relay._update_backlog()
    assert sample(metrics, "dispatcher_outbox_unroutable") == 1


async def test_a_returned_billing_event_is_retried_until_a_queue_is_bound_then_arrives_once(
        pool: asyncpg.Pool, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox, "SWEEP_SECONDS", 3600.0)  # only the retry backoff wakes it
    low = await write(pool, "billing", "balance.low")
    metrics = Metrics(CollectorRegistry())
    relay = OutboxRelay(pool, broker.exchanges, metrics, unroutable_retry=(0.1, 0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        async def returned_twice() -> bool:
            return (await row(pool, low))["attempts"] >= 2
        await wait_for(returned_twice)
        status = await write(pool, "events", "status.sms.sent")

        async def status_published() -> bool:
            return (await row(pool, status))["published_at"] is not None
        await wait_for(status_published)
        assert (await row(pool, low))["published_at"] is None

        queue = await broker.channel.declare_queue(exclusive=True)
        await queue.bind(broker.topology.billing, routing_key="balance.#")

        async def low_published() -> bool:
            return (await row(pool, low))["published_at"] is not None
        await wait_for(low_published)
        # Published after it, so any second copy of balance.low would be in the queue first.
        sentinel = await write(pool, "billing", "balance.depleted")
        async with asyncio.timeout(20):
            received = await receive_until(queue, str(sentinel))
        assert received.count(str(low)) == 1
        assert metrics.registry.get_sample_value(
            "dispatcher_low_balance_events_total", {"type": "balance_low"}) == 1
    finally:
        stop.set()
        await task


async def receive_until(queue: aio_pika.abc.AbstractQueue, last: str) -> list[str]:
    """message_ids from ``queue`` in order, up to and including ``last``."""
    ids: list[str] = []
    async with queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            ids.append(str(message.message_id))
            if message.message_id == last:
                return ids
    raise AssertionError("queue closed")


async def test_a_batch_published_at_once_arrives_in_outbox_order(
        pool: asyncpg.Pool, broker: Broker) -> None:
    """The relay has a whole batch in flight at once: still one copy each, in row order."""
    events = broker.topology.events
    queue = await broker.channel.declare_queue(exclusive=True)
    await queue.bind(events, routing_key="status.#")
    count = outbox.BATCH + 50
    written = [await write(pool, "events", "status.sms.sent") for _ in range(count)]
    relay = OutboxRelay(pool, broker.exchanges, Metrics(CollectorRegistry()))
    assert await relay.relay_once() == outbox.BATCH
    assert await relay.relay_once() == count - outbox.BATCH
    received = []
    for _ in range(count):
        message = await queue.get(timeout=5)
        received.append(uuid.UUID(message.message_id))
        await message.ack()
    assert received == written
    assert await queue.get(fail=False, timeout=1) is None
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
