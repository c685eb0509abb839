"""Subscription periods: when they start and end, account creation, and renewal.

Cadences: ``monthly`` (allocation each month on the renewal day), ``annual`` (allocation once a
year), ``annual_monthly`` (billed yearly, allocated monthly). A renewal day past the end of a
short month falls on that month's last day. Renewal resets subscription credits to the
allocation; the unspent ones are forfeited with a ledger row.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from dispatcher.credits.ledger import CreditStore, check_amount
from dispatcher.db import Connection
from dispatcher.errors import AccountExists, InvalidAutoRecharge, InvalidPlan
from dispatcher.queries import q

CADENCES = ("monthly", "annual", "annual_monthly")


@dataclass(frozen=True)
class Plan:
    """What an account's subscription allocates, and when."""

    allocation: int = 0
    cadence: str = "monthly"
    renewal_day: int = 1

    def __post_init__(self) -> None:
        check_amount(self.allocation, allow_zero=True)
        if self.cadence not in CADENCES:
            raise InvalidPlan(f"cadence must be one of {CADENCES}, got {self.cadence!r}")
        if not 1 <= self.renewal_day <= 31:
            raise InvalidPlan(f"renewal day must be 1..31, got {self.renewal_day}")


def _add_months(moment: datetime, months: int, day: int) -> datetime:
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    last = calendar.monthrange(year, month)[1]
    return moment.replace(year=year, month=month, day=min(day, last))


def period_containing(plan: Plan, now: datetime) -> tuple[datetime, datetime]:
    """The allocation period (start, end) that contains ``now``, anchored on the renewal day."""
    step = 12 if plan.cadence == "annual" else 1
    anchor = now.replace(hour=0, minute=0, second=0, microsecond=0)
    start = _add_months(anchor, 0, plan.renewal_day)
    while start > now:
        start = _add_months(start, -step, plan.renewal_day)
    end = _add_months(start, step, plan.renewal_day)
    while end <= now:
        start, end = end, _add_months(end, step, plan.renewal_day)
    return start, end


def next_period(plan: Plan, period_end: datetime) -> tuple[datetime, datetime]:
    """The period that follows one ending at ``period_end``."""
    step = 12 if plan.cadence == "annual" else 1
    return period_end, _add_months(period_end, step, plan.renewal_day)


def period_reference(account_id: str, start: datetime) -> str:
    """The unique ledger reference of one account's allocation for one period."""
    return f"{account_id}:{start.astimezone(UTC).isoformat()}"


def auto_recharge_problem(enabled: bool, threshold: int, amount: int) -> str | None:
    """Why these auto-recharge settings would charge in a loop, or None: enabled, the amount
    must lift a balance at zero above the threshold (migration 0024 enforces it in SQL too)."""
    if enabled and amount <= threshold:
        return (f"amount ({amount}) must be greater than threshold ({threshold}): one top-up "
                "from zero must lift the balance above the threshold, or it would charge "
                "again and again")
    return None


def check_auto_recharge(enabled: bool, threshold: int, amount: int) -> None:
    """Refuse settings that would charge in a loop (``InvalidAutoRecharge`` names the fields)."""
    problem = auto_recharge_problem(enabled, threshold, amount)
    if problem is not None:
        raise InvalidAutoRecharge(problem, fields=["amount", "threshold"])


async def create_account(db: asyncpg.Pool | Connection, account_id: str, *,
                         name: str = "", plan: Plan | None = None, now: datetime | None = None,
                         auto_recharge: tuple[bool, int, int] = (False, 0, 0)) -> None:
    """Create an account and, with a plan, allocate its first period."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await create_account(conn, account_id, name=name, plan=plan, now=now,
                                        auto_recharge=auto_recharge)
    plan = plan or Plan()
    now = now or datetime.now(UTC)
    enabled, threshold, amount = auto_recharge
    check_auto_recharge(enabled, threshold, amount)
    async with db.transaction():
        created = await db.fetchval(
            q("create_account"), account_id, name, plan.allocation, plan.cadence,
            plan.renewal_day, enabled, check_amount(threshold, allow_zero=True),
            check_amount(amount, allow_zero=True))
        if created is None:
            raise AccountExists(f"account {account_id!r} already exists", account_id=account_id)
        start, end = period_containing(plan, now)
        await CreditStore(db).start_period(
            account_id, plan.allocation, period_reference(account_id, start), start, end)


async def renew_due(pool: asyncpg.Pool, now: datetime | None = None) -> int:
    """Start every period that has come due (catching up missed ones); returns how many."""
    now = now or datetime.now(UTC)
    started = 0
    for row in await pool.fetch(q("accounts_due_for_renewal"), now):
        plan = Plan(row["allocation"], row["cadence"], row["renewal_day"])
        end = row["period_end"]
        amount = row["next_allocation"] if row["next_allocation"] is not None else plan.allocation
        while end <= now:
            start, end = next_period(plan, end)
            if await CreditStore(pool).start_period(
                    row["id"], amount, period_reference(row["id"], start), start, end):
                started += 1
    return started
