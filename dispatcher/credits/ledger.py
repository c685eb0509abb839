"""The credit ledger: reserve before send, settle after, grants, refunds and plan changes.

Every operation is one call to a plpgsql function (see ``sql/migrations/0001_ledger.sql``, and
0006 for ``reserve_batch``) that locks the account row first, so concurrent dispatchers can never
overspend and no read-then-write happens in Python. Each change appends a ledger row with a unique
reference; replays of the same job id or payment reference change nothing. Over a pool,
concurrent ``reserve_many`` calls for one account share round trips
(``dispatcher.credits.coalesce``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

import asyncpg

from dispatcher.credits.coalesce import MAX_JOBS, reserve_coalesced
from dispatcher.errors import (
    AlreadySettled,
    InsufficientCredits,
    InvalidAmount,
    InvalidGrant,
    RefundTooLarge,
    ReservationConflict,
    UnknownAccount,
    UnknownReservation,
)
from dispatcher.queries import q

GrantKind = Literal["purchase", "auto_recharge", "adjustment"]
GRANT_KINDS: frozenset[str] = frozenset({"purchase", "auto_recharge", "adjustment"})


class Executor(Protocol):
    """A pool or a connection (possibly inside a transaction)."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...

    async def fetchrow(self, query: str, *args: Any) -> Any: ...

    async def fetchval(self, query: str, *args: Any) -> Any: ...


@dataclass(frozen=True)
class Reservation:
    """A job's reservation; ``new`` is False when the job id had already reserved."""

    job_id: str
    account_id: str
    amount: int
    new: bool


@dataclass(frozen=True)
class BatchReservation:
    """Outcome of ``reserve_many``: which jobs hold a reservation now and which could not."""

    reserved: list[str]
    existing: list[str]
    insufficient: list[str]
    conflicts: list[str]
    available: int


@dataclass(frozen=True)
class Settlement:
    """Outcome of capture or release; ``replayed`` when the job had been settled the same way."""

    job_id: str
    account_id: str
    status: Literal["captured", "released"]
    reserved: int
    captured: int | None
    replayed: bool


@dataclass(frozen=True)
class Balance:
    """An account's credits by bucket. ``available`` may be negative only after an overage
    or a transactional job reserved into the account's overdraft (spend guards)."""

    account_id: str
    subscription: int
    purchased: int
    debt: int
    reserved: int
    available: int

    @property
    def total(self) -> int:
        """Credits owned: available plus those reserved for jobs in flight."""
        return self.available + self.reserved


def check_amount(amount: object, *, allow_zero: bool = False) -> int:
    """A whole number of credits, positive (or zero when allowed); else InvalidAmount."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(f"amount must be a whole number of credits, got {amount!r}")
    if amount < 0 or (amount == 0 and not allow_zero):
        raise InvalidAmount(f"amount must be {'>= 0' if allow_zero else '> 0'}, got {amount}")
    return amount


class CreditStore:
    """The ledger operations over a pool or a connection.

    ``coalesce``: concurrent ``reserve_many`` calls for one account share one ``reserve_batch``
    in flight at a time (each caller still gets exactly its own outcome). The default is on for
    a pool and off for a connection, whose caller may be inside a transaction of its own.
    ``coalesce_limit`` caps the jobs of one shared batch.
    """

    def __init__(self, db: Executor, *, coalesce: bool | None = None,
                 coalesce_limit: int = MAX_JOBS) -> None:
        self._db = db
        self._coalesce = isinstance(db, asyncpg.Pool) if coalesce is None else coalesce
        self._coalesce_limit = coalesce_limit

    async def reserve(self, job_id: str, account_id: str, amount: int) -> Reservation:
        """Reserve ``amount`` for a job, atomically; the same job id twice reserves once."""
        check_amount(amount)
        [row] = await self._fetch_batch(account_id, [job_id], [amount])
        status = row["status"]
        if status == "unknown_account":
            raise UnknownAccount(f"no account {account_id!r}", account_id=account_id)
        if status == "conflict":
            raise ReservationConflict(job_id=job_id)
        if status == "insufficient":
            raise InsufficientCredits(
                f"account {account_id} has {row['available']} credits available, "
                f"{amount} needed", available=row["available"], needed=amount)
        return Reservation(job_id, account_id, row["amount"], new=status == "reserved")

    async def reserve_many(self, account_id: str,
                           jobs: Sequence[tuple[str, int]]) -> BatchReservation:
        """Reserve a batch of one account's jobs in one round trip, in order, while credits last."""
        if not jobs:
            raise InvalidAmount("reserve_many needs at least one job")
        ids = [job_id for job_id, _ in jobs]
        amounts = [check_amount(amount) for _, amount in jobs]
        if self._coalesce:
            try:
                rows = await reserve_coalesced(self._db, account_id, ids, amounts,
                                               self._fetch_raw, max_jobs=self._coalesce_limit)
            except asyncpg.UniqueViolationError as exc:
                raise ReservationConflict(job_ids=ids) from exc
        else:
            rows = await self._fetch_batch(account_id, ids, amounts)
        if rows[0]["status"] == "unknown_account":
            raise UnknownAccount(f"no account {account_id!r}", account_id=account_id)
        by_status: dict[str, list[str]] = {
            "reserved": [], "existing": [], "insufficient": [], "conflict": []}
        for row in rows:
            by_status[row["status"]].append(row["job_id"])
        return BatchReservation(
            reserved=by_status["reserved"], existing=by_status["existing"],
            insufficient=by_status["insufficient"], conflicts=by_status["conflict"],
            available=rows[-1]["available"])

    async def _fetch_raw(self, account_id: str, ids: list[str], amounts: list[int]) -> list[Any]:
        return await self._db.fetch(q("reserve_batch"), account_id, ids, amounts)

    async def _fetch_batch(self, account_id: str, ids: list[str],
                           amounts: list[int]) -> list[Any]:
        try:
            return await self._fetch_raw(account_id, ids, amounts)
        except asyncpg.UniqueViolationError as exc:
            # Two accounts raced to reserve under one job id; the other one won.
            raise ReservationConflict(job_ids=ids) from exc

    async def capture(self, job_id: str, actual: int) -> Settlement:
        """Settle a reservation to its real cost: more is charged, less is given back."""
        check_amount(actual, allow_zero=True)
        return await self._settle(job_id, actual)

    async def release(self, job_id: str) -> Settlement:
        """Give a reservation back to the buckets it came from."""
        return await self._settle(job_id, None)

    async def _settle(self, job_id: str, actual: int | None) -> Settlement:
        row = await self._db.fetchrow(q("settle_reservation"), job_id, actual)
        status: str = row["status"]
        if status == "unknown":
            raise UnknownReservation(job_id=job_id)
        wanted = "released" if actual is None else "captured"
        replayed = status.startswith("already_")
        final = status.removeprefix("already_")
        if replayed and (final != wanted or (actual is not None and row["captured"] != actual)):
            raise AlreadySettled(
                f"job {job_id} was already {final}"
                + (f" at {row['captured']}" if row["captured"] is not None else ""),
                job_id=job_id)
        return Settlement(job_id, row["account_id"], final,  # type: ignore[arg-type]
                          row["amount"], row["captured"], replayed)

    async def grant(self, account_id: str, amount: int, kind: str, reference: str) -> bool:
        """Add rollover credits, idempotent by ``reference``; False when it was a replay."""
        check_amount(amount)
        if kind not in GRANT_KINDS:
            raise InvalidGrant(f"grant kind must be one of {sorted(GRANT_KINDS)}, got {kind!r}")
        if not reference:
            raise InvalidGrant("a grant needs a reference (e.g. the payment id)")
        row = await self._db.fetchrow(q("grant_credits"), account_id, amount, kind, reference)
        return _grant_outcome(row["status"], account_id, reference)

    async def pause_auto_recharge(self, account_id: str,
                                  settings_changed_at: datetime | None) -> bool:
        """Turn auto-recharge off after billing paused it, unless an owner changed the settings
        after ``settings_changed_at`` (the ones billing saw); True when it was turned off."""
        row = await self._db.fetchrow(q("pause_auto_recharge"), account_id, settings_changed_at)
        return row is not None

    async def start_period(self, account_id: str, amount: int, reference: str,
                           start: datetime, end: datetime) -> bool:
        """Reset subscription credits to ``amount`` for a new period (unspent ones forfeited)."""
        check_amount(amount, allow_zero=True)
        row = await self._db.fetchrow(q("start_subscription_period"), account_id, amount,
                                      reference, start, end)
        return _grant_outcome(row["status"], account_id, reference)

    async def change_plan(self, account_id: str, allocation: int) -> tuple[str, int]:
        """Upgrade now (difference added to this period) or schedule a downgrade for renewal."""
        check_amount(allocation, allow_zero=True)
        row = await self._db.fetchrow(q("change_plan"), account_id, allocation)
        if row["status"] == "unknown_account":
            raise UnknownAccount(f"no account {account_id!r}", account_id=account_id)
        return row["status"], row["sub_added"]

    async def refund(self, account_id: str, purchase_reference: str, amount: int,
                     reference: str) -> bool:
        """Take back unspent credits of one purchase; False when it was a replay."""
        check_amount(amount)
        row = await self._db.fetchrow(q("refund_credits"), account_id, purchase_reference,
                                      amount, reference)
        status = row["status"]
        if status == "unknown_purchase":
            raise InvalidGrant(f"account {account_id} has no purchase {purchase_reference!r}")
        if status == "too_large":
            raise RefundTooLarge(f"only {row['refundable']} credits of that purchase are unspent",
                                 refundable=row["refundable"])
        return _grant_outcome(status, account_id, reference)

    async def balance(self, account_id: str) -> Balance:
        """The account's current balance by bucket."""
        row = await self._db.fetchrow(q("get_account"), account_id)
        if row is None:
            raise UnknownAccount(f"no account {account_id!r}", account_id=account_id)
        return Balance(account_id, row["sub_available"], row["purchased_available"],
                       row["debt"], row["reserved"], row["available"])


def _grant_outcome(status: str, account_id: str, reference: str) -> bool:
    if status == "unknown_account":
        raise UnknownAccount(f"no account {account_id!r}", account_id=account_id)
    if status == "conflict":
        raise InvalidGrant(f"reference {reference!r} was already used for a different change")
    return status in {"granted", "started", "refunded"}
