"""Pure top-up rules: whether an event starts a top-up, how much, the retry backoff, and the
recharge safety rules checked before every new charge (pause, monthly cap, hourly limit)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from billing_client.events import CAP_UNITS, BalanceDepleted, BalanceLow
from billing_client.reference.errors import InvalidSettings

TriggerEvent = BalanceLow | BalanceDepleted

START = "start_topup"
PAUSED = "auto_recharge_paused"
CAPPED = "monthly_cap"
HOURLY = "hourly_limit"
CHARGE = "charge"
CAP_WARNING_LEVELS = (80, 90)


@dataclass(frozen=True)
class AccountState:
    """What the database says about the account, read under its row lock."""

    in_flight: bool
    # The latest top-up of the event's episode, and when it closed: its grant was confirmed
    # by the broker (succeeded) or the service gave up (failed).
    episode_status: str | None = None
    episode_closed_at: datetime | None = None
    # The latest change of payment methods or owner action (re-enable, new cap).
    methods_changed_at: datetime | None = None
    # Auto-recharge turned itself off after consecutive declines (an owner turns it back on),
    # and the owner's last settings change known then (``AutoRecharge.changed_at``).
    paused: bool = False
    paused_settings_at: datetime | None = None
    # The monthly cap was reached this month and has not been raised since.
    capped: bool = False


@dataclass(frozen=True)
class Verdict:
    """A decision code; ``amount`` is set only when a top-up starts."""

    decision: str
    amount: int = 0
    # Starting it lifts the pause: the owner turned auto-recharge on since it paused itself.
    resume: bool = False

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
    if state.paused and not owner_enabled_since_pause(event, state):
        return Verdict(PAUSED)
    if state.capped:
        return Verdict(CAPPED)
    if state.in_flight:
        return Verdict("topup_in_flight")
    if state.episode_status == "succeeded" and not _depleted_after_grant(event, state):
        return Verdict("episode_topped_up")
    if state.episode_status == "failed" and not _methods_changed_after(state):
        return Verdict("episode_gave_up")
    return Verdict(START, amount, resume=state.paused)


def owner_enabled_since_pause(event: TriggerEvent, state: AccountState) -> bool:
    """The event shows auto-recharge on with settings an owner changed after the pause (the
    dispatcher stamps ``changed_at``; no clocks of two services are compared)."""
    changed, known = event.auto_recharge.changed_at, state.paused_settings_at
    return event.auto_recharge.enabled and changed is not None and (
        known is None or changed > known)


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


@dataclass(frozen=True)
class Limits:
    """An account's recharge safety state, read under its row lock just before a charge."""

    paused: bool
    hourly_limit: int
    decline_limit: int
    monthly_cap: int | None
    cap_unit: str
    capped: bool
    charges_last_hour: int
    oldest_in_hour: datetime | None
    month_used: int


@dataclass(frozen=True)
class Gate:
    """Whether a new charge may go out now: ``charge``, or why not (``retry_at`` for later)."""

    decision: str
    retry_at: datetime | None = None


def gate_charge(limits: Limits, amount: int, now: datetime) -> Gate:
    """The rules every new charge passes: not paused, within the monthly cap (the charge must
    fit whole: never a charge past it), and fewer than ``hourly_limit`` charges in the last
    hour (otherwise wait until the oldest of them is an hour old)."""
    if limits.paused:
        return Gate(PAUSED)
    if limits.capped or (limits.monthly_cap is not None
                         and limits.month_used + amount > limits.monthly_cap):
        return Gate(CAPPED)
    if limits.charges_last_hour >= limits.hourly_limit:
        oldest = limits.oldest_in_hour or now
        return Gate(HOURLY, max(now, oldest + timedelta(hours=1)))
    return Gate(CHARGE)


def cap_levels(used: int, cap: int | None) -> list[int]:
    """The warning levels (percent) reached, and 100 when the cap is reached."""
    if cap is None:
        return []
    levels = [level for level in CAP_WARNING_LEVELS if used * 100 >= level * cap]
    return levels + ([100] if used >= cap else [])


def check_limits(*, hourly_limit: int | None = None, decline_limit: int | None = None,
                 monthly_cap: int | None = None, cap_unit: str | None = None,
                 clear_cap: bool = False) -> None:
    """Refuse limits that do not make sense, naming the field."""
    for name, value in (("hourly_limit", hourly_limit), ("decline_limit", decline_limit),
                        ("monthly_cap", monthly_cap)):
        if value is not None and value < 1:
            raise InvalidSettings(f"{name} must be at least 1 (got {value})")
    if cap_unit is not None and cap_unit not in CAP_UNITS:
        raise InvalidSettings(f"cap_unit must be one of {', '.join(CAP_UNITS)}")
    if clear_cap and monthly_cap is not None:
        raise InvalidSettings("monthly_cap and clear_cap exclude each other")
