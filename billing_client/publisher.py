"""Publishing with confirms: persistent JSON messages, every publish confirmed or an error.

``ConfirmedPublisher`` is generic (the dispatcher's job publisher uses it too).
``BillingEventPublisher`` publishes billing events on the billing topic exchange with routing
key = event type and ``message_id`` = ``event_id``. A timeout means the outcome is unknown:
publishing the same event again is safe, consumers deduplicate by ``event_id``.
"""
# Every call takes a ``timeout`` with a default on purpose: a publish must be bounded even when
# the caller forgets to wrap it (a publish on a down connection can block forever).
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from datetime import datetime
from types import TracebackType
from typing import Self

import aio_pika
import aio_pika.exceptions
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from billing_client.amqp import connect_robust
from billing_client.events import BillingClientError, BillingEvent, encode_event

DEFAULT_TIMEOUT = 5.0


class PublishFailed(BillingClientError):
    """The broker did not confirm the message."""

    code = "publish_failed"
    # reason: unavailable | no_exchange (at connect), timeout (outcome unknown) | unroutable |
    # nacked (the broker refused it).

    def __init__(self, detail: str, *, reason: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConfirmedPublisher:
    """One exchange on a channel with publisher confirms; returned (unroutable) messages raise."""

    def __init__(self, connection: AbstractRobustConnection | None, channel: AbstractChannel,
                 exchange: AbstractExchange, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        # Built by ``connect``, or around the caller's channel (opened with publisher confirms).
        # Strong references: robust objects that are garbage-collected stop being restored.
        self._connection = connection
        self._channel = channel
        self._exchange = exchange
        self.timeout = timeout

    @classmethod
    async def connect(cls, amqp_url: str, exchange_name: str, *,
                      timeout: float = DEFAULT_TIMEOUT) -> Self:
        """Connect and open ``exchange_name``, which must already exist.

        ``amqp_url``: one address or a cluster's, comma-separated (``billing_client.amqp``).
        """
        try:
            async with asyncio.timeout(timeout):
                connection = await connect_robust(amqp_url, timeout=timeout)
        except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
            raise PublishFailed(f"cannot connect: {exc!r}", reason="unavailable") from exc
        try:
            async with asyncio.timeout(timeout):
                channel = await connection.channel(publisher_confirms=True,
                                                   on_return_raises=True)
                exchange = await channel.get_exchange(exchange_name, ensure=True)
        except BaseException as exc:
            await connection.close()
            if isinstance(exc, aio_pika.exceptions.ChannelNotFoundEntity):
                raise PublishFailed(f"exchange {exchange_name!r} does not exist",
                                    reason="no_exchange") from exc
            if isinstance(exc, TimeoutError | aio_pika.exceptions.AMQPError):
                raise PublishFailed(repr(exc), reason="unavailable") from exc
            raise
        return cls(connection, channel, exchange, timeout=timeout)

    async def publish(self, body: bytes, *, routing_key: str, message_id: str,
                      type_: str, mandatory: bool = True, timeout: float | None = None,
                      timestamp: datetime | None = None) -> None:
        """Publish one persistent JSON message and wait for the broker's confirm."""
        message = aio_pika.Message(
            body, content_type="application/json", content_encoding="utf-8",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message_id, type=type_,
            timestamp=timestamp)
        unroutable = f"no queue is bound for {routing_key!r} on {self._exchange.name!r}"
        try:
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                confirm = await self._exchange.publish(message, routing_key, mandatory=mandatory)
        except TimeoutError as exc:
            raise PublishFailed("no confirm in time: the outcome is unknown, republishing the "
                                "same id is safe", reason="timeout") from exc
        except aio_pika.exceptions.PublishError as exc:
            raise PublishFailed(unroutable, reason="unroutable") from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishFailed("the broker refused the message", reason="nacked") from exc
        except (aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError,
                ConnectionError) as exc:
            raise PublishFailed(repr(exc), reason="unavailable") from exc
        if not isinstance(confirm, aiormq.spec.Basic.Ack):
            # A channel opened without ``on_return_raises`` hands back the returned message.
            raise PublishFailed(unroutable, reason="unroutable")

    async def close(self) -> None:
        """Close the connection if this publisher opened it (an injected channel is left open)."""
        if self._connection is not None:
            await self._connection.close()


class BillingEventPublisher:
    """Publishes billing events on a topic exchange; the routing key is the event type."""

    def __init__(self, publisher: ConfirmedPublisher, *, mandatory: bool = True) -> None:
        self._publisher = publisher
        self._mandatory = mandatory

    @classmethod
    async def connect(cls, amqp_url: str, exchange_name: str, *,
                      timeout: float = DEFAULT_TIMEOUT, mandatory: bool = True) -> Self:
        """Connect to the broker and the (existing) billing exchange."""
        publisher = await ConfirmedPublisher.connect(amqp_url, exchange_name, timeout=timeout)
        return cls(publisher, mandatory=mandatory)

    async def publish(self, event: BillingEvent, *, timeout: float | None = None) -> None:
        """Publish one event, persistent, and wait for the confirm. Raises ``PublishFailed``."""
        await self._publisher.publish(
            encode_event(event), routing_key=event.routing_key, message_id=str(event.event_id),
            type_=event.type, mandatory=self._mandatory, timeout=timeout,
            timestamp=event.occurred_at)

    async def close(self) -> None:
        """Close the connection."""
        await self._publisher.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()
