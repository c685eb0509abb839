"""Pure top-up rules: whether an event starts a top-up, how much, and the retry backoff."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from billing_client.events import BalanceDepleted, BalanceLow

TriggerEvent = BalanceLow | BalanceDepleted

START = "start_topup"


@dataclass(frozen=True)
class AccountState:
    """What the database says about the account, read under its row lock."""

    in_flight: bool
    # The latest top-up of the event's episode, and when it closed: its grant was confirmed
    # by the broker (succeeded) or the service gave up (failed).
    episode_status: str | None = None
    episode_closed_at: datetime | None = None
    methods_changed_at: datetime | None = None


@dataclass(frozen=True)
class Verdict:
    """A decision code; ``amount`` is set only when a top-up starts."""

    decision: str
    amount: int = 0

    @property
    def starts_topup(self) -> bool:
        """True when a new top-up must be created."""
        return self.decision == START


def wants_topup(event: TriggerEvent) -> bool:
    """With auto-recharge on, or off when the dispatcher insists (at zero, no opt-out)."""
    return event.auto_recharge.enabled or event.topup_requested_even_if_disabled


def shortfall(event: TriggerEvent) -> int:
    """Credits missing right now: held work not covered (depleted) or the stated shortfall."""
    if isinstance(event, BalanceDepleted):
        return max(0, event.held_credits - event.available)
    return event.shortfall or 0


def topup_amount(event: TriggerEvent) -> int:
    """The configured amount, or one charge that closes a larger shortfall."""
    return max(event.auto_recharge.amount, shortfall(event))


def decide(event: TriggerEvent, state: AccountState) -> Verdict:
    """Start a top-up, or say why not; ``state`` must have been read under the account lock."""
    if not wants_topup(event):
        return Verdict("auto_recharge_disabled")
    amount = topup_amount(event)
    if amount <= 0:
        return Verdict("nothing_to_charge")
    if state.in_flight:
        return Verdict("topup_in_flight")
    if state.episode_status == "succeeded" and not _depleted_after_grant(event, state):
        return Verdict("episode_topped_up")
    if state.episode_status == "failed" and not _methods_changed_after(state):
        return Verdict("episode_gave_up")
    return Verdict(START, amount)


def _depleted_after_grant(event: TriggerEvent, state: AccountState) -> bool:
    """A depletion that happened after the grant went out: the credits were not enough."""
    closed = state.episode_closed_at
    return isinstance(event, BalanceDepleted) and closed is not None and (
        event.occurred_at > closed)


def _methods_changed_after(state: AccountState) -> bool:
    """The customer updated the payment methods after we gave up on this episode."""
    changed, closed = state.methods_changed_at, state.episode_closed_at
    return changed is not None and closed is not None and changed > closed


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Exponential delay after the ``attempts``-th failure: base, 2·base, 4·base, … ≤ cap."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))
