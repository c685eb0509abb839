"""Check a live database's money invariants: balances equal the ledger, nothing double-settled."""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.credits.ledger import Executor
from dispatcher.queries import q

CHECKS = (
    "audit_balances_vs_ledger",
    "audit_buckets_vs_ledger",
    "audit_purchased_vs_buckets",
    "audit_reserved_vs_pending",
    "audit_reservation_rows",
    "audit_settle_rows_without_reservation",
    "audit_debt_only_from_settlement",
    "audit_negative_balances",
)


@dataclass(frozen=True)
class Violation:
    """One broken invariant on one account."""

    check: str
    account_id: str
    problem: str


async def run_audit(db: Executor) -> list[Violation]:
    """Run every check; an empty list means the ledger is clean."""
    violations: list[Violation] = []
    for check in CHECKS:
        for row in await db.fetch(q(check)):
            violations.append(Violation(check, row["account_id"], row["problem"]))
    return violations


def format_report(violations: list[Violation], accounts_checked: int) -> str:
    """A human-readable report for the CLI."""
    if not violations:
        return f"audit OK: {accounts_checked} accounts, {len(CHECKS)} checks, no violations"
    lines = [f"audit FAILED: {len(violations)} violation(s)"]
    lines += [f"  [{v.check}] account {v.account_id}: {v.problem}" for v in violations]
    return "\n".join(lines)
