"""Apply ``credits.granted`` events from the billing service, each exactly once.

The payment reference is the grant's ledger reference, so a redelivered or duplicated event
changes nothing. Granting credits to a paused account wakes the resumer through PostgreSQL.
``topup.failed`` is logged: the account stays paused with its jobs held until credits arrive.
``topup.disabled`` (billing paused auto-recharge after declined charges) turns auto-recharge off
here too, unless an owner changed the settings since; turning it on again is an owner action.
"""

from __future__ import annotations

import asyncio

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from billing_client.events import (
    CreditsGranted,
    InvalidEvent,
    TopupDisabled,
    TopupFailed,
    decode_event,
)
from dispatcher.credits.ledger import CreditStore
from dispatcher.errors import DispatcherError
from dispatcher.events.topology import Names, Topology, quorum
from dispatcher.loops import Backoff, is_outage
from dispatcher.metrics import Metrics

log = structlog.get_logger(__name__)

LISTENED = ("credits.granted", "topup.failed", "topup.disabled")
RETRY_DELAY_SECONDS = 1.0
PREFETCH = 32
OUTAGE_BACKOFF = Backoff(first=0.5, cap=5.0)


async def declare_credits_queue(channel: AbstractChannel, names: Names,
                                topology: Topology, quorum_group_size: int = 0) -> AbstractQueue:
    """The dispatcher's queue of billing replies; bounds the channel's unacked messages."""
    await channel.set_qos(prefetch_count=PREFETCH)
    queue = await channel.declare_queue(
        f"{names.prefix}.credits", durable=True, arguments=quorum(quorum_group_size, {
            "x-delivery-limit": 10, "x-dead-letter-exchange": names.dead_exchange,
            "x-dead-letter-routing-key": "delivery_limit"}))
    for routing_key in LISTENED:
        await queue.bind(topology.billing, routing_key=routing_key)
    return queue


class CreditsListener:
    """Consumes grants and writes them to the ledger (idempotent by payment reference)."""

    def __init__(self, store: CreditStore, topology: Topology,
                 metrics: Metrics | None = None) -> None:
        self._store = store
        self._topology = topology
        self._metrics = metrics

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Apply one event. Through a database outage it is applied again in place, with
        backoff, unacked: a paid grant must not burn its deliveries and be dropped. Any other
        failure requeues it after a pause (the delivery limit ends a loop)."""
        failures = 0
        while True:
            try:
                await self._apply(message)
                return
            except (InvalidEvent, DispatcherError) as exc:
                await self._reject(message, exc)
                return
            except Exception as exc:
                if not (is_outage(exc) and _channel_open(message)):
                    log.error("credits_event_failed", message_id=message.message_id,
                              exc_info=exc)
                    break
                failures += 1
                log.warning("credits_event_waiting_for_database", message_id=message.message_id,
                            error=type(exc).__name__, failures=failures)
                await asyncio.sleep(OUTAGE_BACKOFF.delay(failures))
        await asyncio.sleep(RETRY_DELAY_SECONDS)
        await message.nack(requeue=True)

    async def _apply(self, message: AbstractIncomingMessage) -> None:
        event = decode_event(message.body)
        if isinstance(event, TopupFailed):
            # The account stays paused and its jobs held; billing retries or gave up.
            await message.ack()
            log.warning("topup_failed", account_id=event.account, reason=event.reason,
                        attempts=event.attempts, gave_up=event.next_attempt_at is None)
            return
        if isinstance(event, TopupDisabled):
            turned_off = await self._store.pause_auto_recharge(event.account,
                                                               event.settings_changed_at)
            await message.ack()
            log.warning("auto_recharge_paused_by_billing", account_id=event.account,
                        declines=event.declines, turned_off=turned_off)
            return
        if not isinstance(event, CreditsGranted):
            raise InvalidEvent(f"unexpected event type {event.type!r} on the credits queue")
        new = await self._store.grant(event.account, event.amount, event.kind,
                                      event.payment_reference)
        await message.ack()
        if self._metrics is not None:
            self._metrics.topups.labels(result="applied" if new else "duplicate").inc()
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
        if self._metrics is not None:
            self._metrics.topups.labels(result="rejected").inc()
        log.warning("credits_event_rejected", reason=code)


def _channel_open(message: AbstractIncomingMessage) -> bool:
    """False once the message's channel is gone (the broker redelivers it: stop waiting)."""
    try:
        return not message.channel.is_closed
    except aio_pika.exceptions.ChannelInvalidStateError:
        return False
