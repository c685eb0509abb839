"""The AMQP side: declare our queue on the billing exchange, consume, ack by outcome.

``<prefix>.billing-service`` is a quorum queue bound to ``balance.low`` and ``balance.depleted``
with an explicit delivery limit (RabbitMQ 3.10 has no default); past it, and for undecodable
events, messages go to ``<prefix>.billing-service.dead``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import aio_pika
import aio_pika.exceptions
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from billing_client.reference.handler import TRIGGER_TYPES, DeadLetter, Done, Outcome, RetryLater
from billing_client.reference.settings import BillingSettings

log = structlog.get_logger(__name__)

Handle = Callable[[bytes], Awaitable[Outcome]]
RETRY_DELAY_SECONDS = 1.0
PUBLISH_TIMEOUT_SECONDS = 10.0


async def declare(channel: AbstractChannel, settings: BillingSettings) -> AbstractExchange:
    """Declare the billing exchange, our queue and its dead-letter queue (idempotent)."""
    exchange = await channel.declare_exchange(settings.exchange, aio_pika.ExchangeType.TOPIC,
                                              durable=True)
    await channel.declare_queue(settings.dead_queue, durable=True,
                                arguments={"x-queue-type": "quorum"})
    queue = await channel.declare_queue(settings.queue, durable=True, arguments={
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.dead_queue,
    })
    for routing_key in TRIGGER_TYPES:
        await queue.bind(exchange, routing_key=routing_key)
    return exchange


class EventConsumer:
    """Consumes our queue; counts decisions (``decisions``) for operators and tests."""

    def __init__(self, connection: AbstractRobustConnection, settings: BillingSettings,
                 handle: Handle) -> None:
        self._connection = connection
        self._settings = settings
        self._handle = handle
        self.decisions: Counter[str] = Counter()
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        """Open a confirming channel, set the prefetch and start consuming."""
        self._channel = await self._connection.channel(publisher_confirms=True)
        await self._channel.set_qos(prefetch_count=self._settings.prefetch)
        self._queue = await self._channel.get_queue(self._settings.queue)
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self, grace_seconds: float) -> None:
        """Stop consuming, let in-flight messages finish (bounded), close the channel."""
        if self._queue is not None and self._tag is not None:
            await self._queue.cancel(self._tag)
            self._tag = None
        try:
            await asyncio.wait_for(self._idle.wait(), grace_seconds)
        except TimeoutError:
            log.warning("billing_consumer_drain_timeout", in_flight=self._in_flight)
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._in_flight += 1
        self._idle.clear()
        try:
            try:
                outcome = await self._handle(message.body)
            except Exception:
                log.exception("billing_event_crashed", message_id=message.message_id)
                outcome = RetryLater("handler_crashed")  # the delivery limit ends a loop
            await self._settle(message, outcome)
        except (aio_pika.exceptions.AMQPError, ConnectionError) as exc:
            # The broker redelivers an unsettled message; our state makes that harmless.
            log.warning("billing_event_settle_failed", error=type(exc).__name__)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _settle(self, message: AbstractIncomingMessage, outcome: Outcome) -> None:
        """Turn the outcome into ack, requeue or dead letter."""
        if isinstance(outcome, Done):
            self.decisions[outcome.decision] += 1
            await message.ack()
        elif isinstance(outcome, RetryLater):
            await asyncio.sleep(RETRY_DELAY_SECONDS)
            await message.nack(requeue=True)
        else:
            self.decisions["dead_letter"] += 1
            await self._dead_letter(message, outcome)

    async def _dead_letter(self, message: AbstractIncomingMessage, outcome: DeadLetter) -> None:
        """Park the message with its reason; if that fails, let the broker dead-letter it."""
        assert self._channel is not None
        parked = aio_pika.Message(
            message.body, headers={"x-reason": outcome.reason, "x-detail": outcome.detail[:500]},
            content_type=message.content_type, message_id=message.message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                await self._channel.default_exchange.publish(
                    parked, routing_key=self._settings.dead_queue)
        except (TimeoutError, aio_pika.exceptions.AMQPError) as exc:
            log.warning("dead_letter_publish_failed", error=type(exc).__name__)
            await message.reject(requeue=False)
            return
        await message.ack()
        log.warning("billing_event_dead_lettered", reason=outcome.reason,
                    message_id=message.message_id)
