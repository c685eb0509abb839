"""What a billing service would receive: every event on the billing exchange, for the checks."""

from __future__ import annotations

import json
from typing import Any

import aio_pika
from aio_pika.abc import AbstractQueue, AbstractRobustConnection

from dispatcher.events.topology import Names
from dispatcher.settings import Settings


async def bind_billing_sink(s: Settings) -> tuple[AbstractRobustConnection,
                                                   AbstractQueue]:
    """What a billing service would receive: a queue on the billing exchange (declared first)."""
    connection = await aio_pika.connect_robust(s.amqp_url)
    channel = await connection.channel()
    names = Names(s.amqp_prefix)
    exchange = await channel.declare_exchange(names.billing_exchange,
                                              aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"{s.amqp_prefix}.billing-sink", durable=True)
    await queue.bind(exchange, routing_key="#")
    return connection, queue


async def drain(queue: AbstractQueue) -> list[dict[str, Any]]:
    bodies = []
    while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
        bodies.append(json.loads(message.body))
    return bodies


def low_balance_problems(bodies: list[dict[str, Any]]) -> list[str]:
    """Redeliveries repeat an event id; a second event for one episode is a double report."""
    events: dict[tuple[Any, Any], set[Any]] = {
        (b["account"], b["episode"]): set() for b in bodies if b["type"] == "balance.low"}
    for b in bodies:
        if b["type"] == "balance.low":
            events[(b["account"], b["episode"])].add(b["event_id"])
    return [f"{key}: {len(ids)} balance.low events" for key, ids in events.items() if len(ids) > 1]


