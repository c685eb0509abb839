"""Per-account spend guards: settings and state (enforced in ``reserve_guarded``, migration 0023;
kept on the ``accounts`` row since 0031, read through the ``account_guards`` view).

The database does the enforcing, in the reservation's own transaction under the account lock;
this module only reads and writes the settings, and releases a velocity hold for an owner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dispatcher.credits.ledger import Executor
from dispatcher.queries import q

# Refusals (nothing reserved) and holds a guard can decide, as reasons in events and jobs.
REFUSAL_REASONS: tuple[str, ...] = ("country_not_allowed", "price_above_limit")
HOLD_REASONS: tuple[str, ...] = ("daily_cap", "velocity")
DEFAULT_VELOCITY_MIN_CREDITS = 100


@dataclass(frozen=True)
class GuardSettings:
    """What an owner sets; ``None`` turns a guard off (all off by default)."""

    daily_spend_cap: int | None = None
    allowed_countries: tuple[str, ...] | None = None
    max_credits_per_message: int | None = None
    velocity_window_seconds: int | None = None
    velocity_multiple: float | None = None
    velocity_min_credits: int = DEFAULT_VELOCITY_MIN_CREDITS
    transactional_reserve: int = 0
    transactional_overdraft: int = 0


@dataclass(frozen=True)
class GuardState:
    """An account's guard settings and where it stands today (UTC)."""

    settings: GuardSettings
    spent_today: int
    capped_until: datetime | None
    velocity_held_since: datetime | None

    def remaining_today(self) -> int | None:
        """Credits that may still be reserved today under the daily cap (None: no cap)."""
        cap = self.settings.daily_spend_cap
        return None if cap is None else max(cap - self.spent_today, 0)

    def as_json(self) -> dict[str, Any]:
        """The settings and state, as the API and the CLI show them."""
        s = self.settings
        return {
            "daily_spend_cap": s.daily_spend_cap,
            "allowed_countries": None if s.allowed_countries is None
            else list(s.allowed_countries),
            "max_credits_per_message": s.max_credits_per_message,
            "velocity_window_seconds": s.velocity_window_seconds,
            "velocity_multiple": s.velocity_multiple,
            "velocity_min_credits": s.velocity_min_credits,
            "transactional_reserve": s.transactional_reserve,
            "transactional_overdraft": s.transactional_overdraft,
            "spent_today": self.spent_today,
            "remaining_today": self.remaining_today(),
            "capped_until": None if self.capped_until is None
            else self.capped_until.isoformat(),
            "velocity_held_since": None if self.velocity_held_since is None
            else self.velocity_held_since.isoformat(),
        }


NO_GUARDS = GuardState(GuardSettings(), 0, None, None)


def _settings(row: Any) -> GuardSettings:
    countries = row["allowed_countries"]
    return GuardSettings(
        daily_spend_cap=row["daily_spend_cap"],
        allowed_countries=None if countries is None else tuple(countries),
        max_credits_per_message=row["max_credits_per_message"],
        velocity_window_seconds=row["velocity_window_seconds"],
        velocity_multiple=row["velocity_multiple"],
        velocity_min_credits=row["velocity_min_credits"],
        transactional_reserve=row["transactional_reserve"],
        transactional_overdraft=row["transactional_overdraft"])


async def load_guards(db: Executor, account: str) -> GuardState:
    """The account's guards (``NO_GUARDS`` when none was ever set)."""
    row = await db.fetchrow(q("guards_get"), account)
    if row is None:
        return NO_GUARDS
    return GuardState(_settings(row), row["spent_today"], row["capped_until"],
                      row["velocity_held_at"])


def _countries(countries: Sequence[str] | None) -> list[str] | None:
    return None if countries is None else sorted({c.upper() for c in countries})


async def set_guards(db: Executor, account: str, settings: GuardSettings) -> bool:
    """Replace the account's guard settings; False when there is no such account."""
    found = await db.fetchval(
        q("guards_set"), account, settings.daily_spend_cap,
        _countries(settings.allowed_countries), settings.max_credits_per_message,
        settings.velocity_window_seconds, settings.velocity_multiple,
        settings.velocity_min_credits, settings.transactional_reserve,
        settings.transactional_overdraft)
    return found is not None


async def release_velocity(db: Executor, account: str) -> bool:
    """End the account's velocity hold (an owner's decision); False when it was not held."""
    return bool(await db.fetchval(q("guards_release_velocity"), account))
