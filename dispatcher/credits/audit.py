"""Check a live database's money invariants: balances equal the ledger, nothing double-settled.

Beyond sums, every ledger row must agree with itself (its amount with its deltas), with its
reservation and with the job's ``final_cost``, and the ledger's append-only triggers must be in
place; so an edit has to be made consistently in several tables to pass. Given the reference
billing service's database, every payment grant is also matched to the invoice of its payment.
"""

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
    "audit_ledger_amounts",
    "audit_ledger_vs_reservations",
    "audit_final_cost_vs_captures",
    "audit_ledger_guards",
    "audit_daily_spend_caps",
)
# How long a paid invoice may wait for its credits.granted to be applied before it is missing.
BILLING_GRACE_SECONDS = 600.0


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


async def cross_check_billing(db: Executor, billing: Executor, *,
                              grace_seconds: float = BILLING_GRACE_SECONDS) -> list[Violation]:
    """Every purchase or auto-recharge grant has its payment's invoice (same account and
    credits) in the reference billing service's store, and every invoice its grant."""
    check = "billing_cross_check"
    grants = {row["payment_reference"]: row for row in await db.fetch(q("audit_payment_grants"))}
    invoices = {row["payment_reference"]: row
                for row in await billing.fetch(q("audit_billing_invoices"), grace_seconds)}
    violations: list[Violation] = []
    for reference, grant in sorted(grants.items()):
        invoice = invoices.get(reference)
        if invoice is None:
            violations.append(Violation(check, grant["account_id"], (
                f"grant {reference!r} ({grant['kind']}, {grant['amount']} credits) has no "
                "billing invoice")))
        elif (invoice["account"], invoice["credits"]) != (grant["account_id"], grant["amount"]):
            violations.append(Violation(check, grant["account_id"], (
                f"grant {reference!r} of {grant['amount']} credits differs from its invoice: "
                f"{invoice['credits']} credits for account {invoice['account']!r}")))
    for reference, invoice in sorted(invoices.items()):
        if reference not in grants and invoice["overdue"]:
            violations.append(Violation(check, invoice["account"], (
                f"invoice {reference!r} ({invoice['credits']} credits) was paid but never "
                "granted")))
    return violations


def format_report(violations: list[Violation], accounts_checked: int) -> str:
    """A human-readable report for the CLI."""
    if not violations:
        return f"audit OK: {accounts_checked} accounts, {len(CHECKS)} checks, no violations"
    lines = [f"audit FAILED: {len(violations)} violation(s)"]
    lines += [f"  [{v.check}] account {v.account_id}: {v.problem}" for v in violations]
    return "\n".join(lines)
