"""An in-memory model of the ledger's rules, the oracle for the stateful test."""

from __future__ import annotations

from dataclasses import dataclass, field


class ModelRefused(Exception):
    """The model says the operation must fail with the named error."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


@dataclass
class ModelReservation:
    amount: int
    sub_part: int
    period: int
    parts: list[tuple[str, int]]
    status: str = "pending"
    captured: int | None = None


@dataclass
class LedgerModel:
    """Subscription first, then buckets oldest first; debt only by overage, repaid first."""

    sub: int = 0
    period: int = 0
    debt: int = 0
    buckets: dict[str, int] = field(default_factory=dict)  # reference -> remaining, in age order
    grants: dict[str, int] = field(default_factory=dict)
    refunds: dict[str, int] = field(default_factory=dict)
    periods: dict[str, int] = field(default_factory=dict)
    reservations: dict[str, ModelReservation] = field(default_factory=dict)

    @property
    def available(self) -> int:
        return self.sub + sum(self.buckets.values()) - self.debt

    @property
    def reserved(self) -> int:
        return sum(r.amount for r in self.reservations.values() if r.status == "pending")

    def _take(self, amount: int, allow_debt: bool) -> tuple[int, list[tuple[str, int]]]:
        sub_taken = min(self.sub, amount)
        self.sub -= sub_taken
        rest = amount - sub_taken
        parts = []
        for ref, remaining in self.buckets.items():
            if rest == 0:
                break
            part = min(remaining, rest)
            if part:
                self.buckets[ref] -= part
                parts.append((ref, part))
                rest -= part
        if rest:
            assert allow_debt
            self.debt += rest
        return sub_taken, parts

    def _repay(self, amount: int) -> int:
        repay = min(self.debt, amount)
        self.debt -= repay
        return amount - repay

    def reserve(self, job: str, amount: int) -> bool:
        if job in self.reservations:
            return False
        if self.available < amount:
            raise ModelRefused("InsufficientCredits")
        sub_part, parts = self._take(amount, allow_debt=False)
        self.reservations[job] = ModelReservation(amount, sub_part, self.period, parts)
        return True

    def reserve_many(self, jobs: list[tuple[str, int]]) -> list[str]:
        reserved, exhausted = [], False
        for job, amount in jobs:
            if job in self.reservations:
                continue
            if exhausted or self.available < amount:
                exhausted = True
                continue
            self.reserve(job, amount)
            reserved.append(job)
        return reserved

    def settle(self, job: str, actual: int | None) -> bool:
        r = self.reservations.get(job)
        if r is None:
            raise ModelRefused("UnknownReservation")
        wanted = "released" if actual is None else "captured"
        if r.status != "pending":
            if r.status == wanted and r.captured == actual:
                return False
            raise ModelRefused("AlreadySettled")
        r.status, r.captured = wanted, actual
        spent = actual or 0
        if spent > r.amount:
            self._take(spent - r.amount, allow_debt=True)
            return True
        spent_sub = min(r.sub_part, spent)
        spent_purchased = spent - spent_sub
        if r.period == self.period:
            self.sub += self._repay(r.sub_part - spent_sub)
        for ref, part in r.parts:
            used = min(part, spent_purchased)
            spent_purchased -= used
            self.buckets[ref] += self._repay(part - used)
        return True

    def grant(self, ref: str, amount: int) -> bool:
        if ref in self.grants:
            if self.grants[ref] != amount:
                raise ModelRefused("InvalidGrant")
            return False
        self.grants[ref] = amount
        self.buckets[ref] = self._repay(amount)
        return True

    def renew(self, ref: str, amount: int) -> bool:
        if ref in self.periods:
            return False
        self.periods[ref] = amount
        self.period += 1
        self.sub = self._repay(amount)
        return True

    def refund(self, bucket: str, amount: int, ref: str) -> bool:
        if ref in self.refunds:
            if self.refunds[ref] != amount:
                raise ModelRefused("InvalidGrant")
            return False
        if bucket not in self.buckets:
            raise ModelRefused("InvalidGrant")
        if self.buckets[bucket] < amount:
            raise ModelRefused("RefundTooLarge")
        self.refunds[ref] = amount
        self.buckets[bucket] -= amount
        return True
