"""The billing side's own checks: no charge past a safety rule, no duplicate grant.

Each invoice carries the limits in force when it was charged, so a limit changed later does not
make an old charge look wrong. ``dispatcher audit --billing-dsn`` matches grants to invoices
across the two services.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from billing_client.reference.queries import q

CHECKS = ("audit_hourly_limit", "audit_monthly_cap", "audit_one_charge_per_topup",
          "audit_topup_invoice_grant", "audit_duplicate_grants")


@dataclass(frozen=True)
class Violation:
    """One broken rule on one account."""

    check: str
    account: str
    problem: str


async def run_checks(db: asyncpg.Pool | asyncpg.Connection) -> list[Violation]:
    """Run every check; an empty list means clean."""
    found: list[Violation] = []
    for check in CHECKS:
        for row in await db.fetch(q(check)):
            found.append(Violation(check.removeprefix("audit_"), str(row["account"]),
                                   str(row["problem"])))
    return found
