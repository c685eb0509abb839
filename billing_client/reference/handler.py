"""Turning one ``balance.low`` / ``balance.depleted`` into a committed decision and an outcome.

The handler knows nothing of AMQP: it returns ``Done``, ``RetryLater`` or ``DeadLetter`` and the
consumer alone acknowledges. ``Done`` is returned only after the decision was committed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from billing_client.events import BalanceDepleted, BalanceLow, InvalidEvent, decode_event
from billing_client.reference.decision import decide
from billing_client.reference.store import DATABASE_ERRORS, BillingStore

log = structlog.get_logger(__name__)

TRIGGER_TYPES = ("balance.low", "balance.depleted")


@dataclass(frozen=True)
class Done:
    """Decided and committed (or a duplicate): acknowledge."""

    decision: str
    topup_id: int | None = None


@dataclass(frozen=True)
class RetryLater:
    """Our state could not be written (database trouble): requeue."""

    reason: str


@dataclass(frozen=True)
class DeadLetter:
    """Never retry: park the message on the dead-letter queue with this reason."""

    reason: str
    detail: str


Outcome = Done | RetryLater | DeadLetter


class EventHandler:
    """Decodes, deduplicates and decides; wakes the top-up worker when a top-up starts."""

    def __init__(self, store: BillingStore, on_topup: Callable[[], None]) -> None:
        self._store = store
        self._on_topup = on_topup

    async def handle(self, body: bytes) -> Outcome:
        """The outcome of one delivered message."""
        try:
            event = decode_event(body)
        except InvalidEvent as exc:
            return DeadLetter(exc.reason, exc.detail)
        if not isinstance(event, BalanceLow | BalanceDepleted):
            return DeadLetter("unexpected_type", f"{event.type} is not for the billing service")
        try:
            verdict, topup_id = await self._store.apply_trigger(event, decide)
        except DATABASE_ERRORS as exc:
            log.warning("billing_event_retry", event_id=str(event.event_id),
                        account_id=event.account, error=type(exc).__name__)
            return RetryLater(type(exc).__name__)
        log.info("billing_event_handled", event_id=str(event.event_id), event_type=event.type,
                 account_id=event.account, episode=event.episode, decision=verdict.decision,
                 topup_id=topup_id, amount=verdict.amount or None)
        if verdict.starts_topup:
            self._on_topup()
        return Done(verdict.decision, topup_id)
