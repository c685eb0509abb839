"""Apply ``credits.granted`` events from the billing service, each exactly once.

The payment reference is the grant's ledger reference, so a redelivered or duplicated event
changes nothing. Granting credits to a paused account wakes the resumer through PostgreSQL.
"""

from __future__ import annotations

import asyncio

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from billing_client.events import InvalidEvent, decode_event
from dispatcher.errors import DispatcherError
from dispatcher.ledger import CreditStore
from dispatcher.topology import Names, Topology

log = structlog.get_logger(__name__)


async def declare_credits_queue(channel: AbstractChannel, names: Names,
                                topology: Topology) -> AbstractQueue:
    """The dispatcher's queue of grants coming back from billing."""
    queue = await channel.declare_queue(
        f"{names.prefix}.credits", durable=True, arguments={
            "x-queue-type": "quorum", "x-delivery-limit": 10,
            "x-dead-letter-exchange": names.dead_exchange,
            "x-dead-letter-routing-key": "delivery_limit"})
    await queue.bind(topology.billing, routing_key="credits.granted")
    return queue


class CreditsListener:
    """Consumes grants and writes them to the ledger (idempotent by payment reference)."""

    def __init__(self, store: CreditStore, topology: Topology) -> None:
        self._store = store
        self._topology = topology

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            event = decode_event(message.body)
            if event.type != "credits.granted":
                raise InvalidEvent(f"unexpected event type {event.type!r} on the credits queue")
            new = await self._store.grant(event.account, event.amount, event.kind,
                                          event.payment_reference)
        except (InvalidEvent, DispatcherError) as exc:
            await self._reject(message, exc)
            return
        await message.ack()
        log.info("credits_granted", account_id=event.account, amount=event.amount,
                 duplicate=not new)

    async def _reject(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        code = getattr(exc, "code", "invalid_event")
        async with asyncio.timeout(10):
            await self._topology.dead.publish(
                aio_pika.Message(message.body, headers={"x-reason": str(code),
                                                        "x-detail": str(exc)[:500]},
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=str(code))
        await message.ack()
        log.warning("credits_event_rejected", reason=code)
