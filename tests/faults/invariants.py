"""The money and delivery invariants every fault scenario ends with.

Each check returns human-readable violations (empty when it holds), so a scenario reports all
that broke at once, beside its seed:

* the ledger audit is clean;
* the provider got at most one create per job, and exactly one for every job we call sent;
* every job is terminal, or held because its account cannot pay for it;
* each account's charges equal its sends times the price;
* an account is paused exactly when it holds jobs it cannot pay for;
* every outbox event was relayed, and no low-balance episode was emitted twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import asyncpg

from dispatcher.credits.audit import run_audit
from tests.integration.sandbox_fixture import SandboxHandle

SENT = ("sent", "delivered", "undelivered")
TERMINAL = (*SENT, "failed", "expired", "canceled")


def creates_per_job(sandbox: SandboxHandle, public_base_url: str | Sequence[str]) -> Counter[str]:
    """Accepted creates at the sandbox, by the job id in their status-callback URL (of any of
    the replicas' base URLs when given several)."""
    bases = [public_base_url] if isinstance(public_base_url, str) else list(public_base_url)
    prefixes = tuple(f"{base}/twilio/status/" for base in bases)
    counts: Counter[str] = Counter()
    for record in sandbox.state.creates(accepted=True):
        callback = record.status_callback or ""
        for prefix in prefixes:
            if callback.startswith(prefix):
                counts[callback.removeprefix(prefix)] += 1
                break
    return counts


async def audit_clean(pool: asyncpg.Pool) -> list[str]:
    return [f"audit: {v}" for v in await run_audit(pool)]


async def sent_once(pool: asyncpg.Pool, sandbox: SandboxHandle,
                    public_base_url: str | Sequence[str],
                    job_ids: Iterable[str]) -> list[str]:
    creates = creates_per_job(sandbox, public_base_url)
    rows = await pool.fetch("SELECT job_id, status FROM jobs WHERE job_id = ANY($1::text[])",
                            list(job_ids))
    status = {r["job_id"]: r["status"] for r in rows}
    problems = [f"job {j}: {n} creates at the provider" for j, n in creates.items() if n > 1]
    problems += [f"job {j}: status {s} but {creates[j]} creates" for j, s in status.items()
                 if s in SENT and creates[j] != 1]
    problems += [f"job {j}: status {s} yet the provider has it" for j, s in status.items()
                 if s not in SENT and s != "unknown" and creates[j] > 0]
    return problems


async def all_settled(pool: asyncpg.Pool, accounts: Iterable[str]) -> list[str]:
    """Every job terminal, or held by an account whose credits do not cover its next job."""
    rows = await pool.fetch(
        "SELECT j.job_id, j.status, j.estimate, a.paused_at IS NOT NULL AS paused,"
        "       a.sub_available + a.purchased_available AS available"
        "  FROM jobs j JOIN accounts a ON a.id = j.account_id"
        " WHERE j.account_id = ANY($1::text[]) AND j.status <> ALL($2::text[])",
        list(accounts), list(TERMINAL))
    return [f"job {r['job_id']}: {r['status']} (paused={r['paused']}, available="
            f"{r['available']}, estimate={r['estimate']})"
            for r in rows
            if not (r["status"] == "held" and r["paused"] and r["available"] < r["estimate"])]


async def charges_match_sends(pool: asyncpg.Pool, accounts: Iterable[str],
                              price: int) -> list[str]:
    rows = await pool.fetch(
        "SELECT a.id,"
        "       (SELECT count(*) FROM jobs j WHERE j.account_id = a.id"
        "           AND j.status = ANY($2::text[])) AS sends,"
        "       (SELECT coalesce(sum(r.captured), 0) FROM reservations r"
        "           WHERE r.account_id = a.id AND r.status = 'captured') AS captured,"
        "       (SELECT count(*) FROM reservations r"
        "           WHERE r.account_id = a.id AND r.status = 'pending') AS pending"
        "  FROM accounts a WHERE a.id = ANY($1::text[])",
        list(accounts), list(SENT))
    problems = [f"account {r['id']}: charged {r['captured']} for {r['sends']} sends x {price}"
                for r in rows if r["captured"] != r["sends"] * price]
    problems += [f"account {r['id']}: {r['pending']} reservations still pending"
                 for r in rows if r["pending"]]
    return problems


async def paused_iff_short(pool: asyncpg.Pool, accounts: Iterable[str]) -> list[str]:
    rows = await pool.fetch(
        "SELECT a.id, a.paused_at IS NOT NULL AS paused,"
        "       a.sub_available + a.purchased_available AS available,"
        "       (SELECT min(j.estimate) FROM jobs j WHERE j.account_id = a.id"
        "           AND j.status = 'held') AS next_cost"
        "  FROM accounts a WHERE a.id = ANY($1::text[])", list(accounts))
    problems = []
    for r in rows:
        short = r["next_cost"] is not None and r["available"] < r["next_cost"]
        if r["paused"] != short:
            problems.append(f"account {r['id']}: paused={r['paused']} with available "
                            f"{r['available']} and next held cost {r['next_cost']}")
    return problems


async def events_relayed(pool: asyncpg.Pool, accounts: Iterable[str]) -> list[str]:
    """Nothing left in the outbox, and no low-balance episode of an account reported twice."""
    unpublished = await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    problems = [f"outbox: {unpublished} events never relayed"] if unpublished else []
    rows = await pool.fetch(
        "SELECT body->>'account' AS account, body->>'episode' AS episode, count(*) AS n"
        "  FROM outbox WHERE routing_key = 'balance.low' AND body->>'account' = ANY($1::text[])"
        " GROUP BY 1, 2 HAVING count(*) > 1", list(accounts))
    problems += [f"account {r['account']}: balance.low episode {r['episode']} emitted "
                 f"{r['n']} times" for r in rows]
    return problems


async def check_all(pool: asyncpg.Pool, sandbox: SandboxHandle,
                    public_base_url: str | Sequence[str],
                    accounts: list[str], job_ids: list[str], price: int = 1) -> list[str]:
    """Every invariant above, in one list of violations."""
    return [
        *await audit_clean(pool),
        *await sent_once(pool, sandbox, public_base_url, job_ids),
        *await all_settled(pool, accounts),
        *await charges_match_sends(pool, accounts, price),
        *await paused_iff_short(pool, accounts),
        *await events_relayed(pool, accounts),
    ]
