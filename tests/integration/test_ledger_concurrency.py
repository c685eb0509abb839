"""Several OS processes reserving against one account never overspend nor double-reserve."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 4
TASKS_PER_PROCESS = 8


async def run_processes(dsn: str, account: str,
                        job_lists: list[list[str]]) -> list[dict[str, object]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.integration.reserve_worker", dsn, account,
             str(TASKS_PER_PROCESS), *jobs],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for jobs in job_lists
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0
        results.append(json.loads(out))
    return results


async def test_exactly_n_of_many_concurrent_reservations_succeed(
        pool: asyncpg.Pool, database_url: str) -> None:
    funded_for = 300
    account = f"hot-{uuid.uuid4().hex[:8]}"
    await create_account(pool, account)
    await CreditStore(pool).grant(account, funded_for, "purchase", f"{account}-pay")
    job_lists = [[f"{account}-p{p}-j{i}" for i in range(150)] for p in range(PROCESSES)]

    results = await run_processes(database_url, account, job_lists)

    reserved = [job for r in results for job in r["new"]]  # type: ignore[attr-defined]
    refused = sum(int(r["refused"]) for r in results)  # type: ignore[call-overload]
    assert len(reserved) == funded_for
    assert refused == PROCESSES * 150 - funded_for
    balance = await CreditStore(pool).balance(account)
    assert (balance.available, balance.reserved) == (0, funded_for)
    assert await run_audit(pool) == []


async def test_duplicate_job_ids_across_processes_reserve_once(
        pool: asyncpg.Pool, database_url: str) -> None:
    account = f"dup-{uuid.uuid4().hex[:8]}"
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 500, "purchase", f"{account}-pay")
    shared = [f"{account}-j{i}" for i in range(200)]
    # Every process tries every job id, in a different order.
    job_lists = [shared[p::1] if p % 2 == 0 else list(reversed(shared)) for p in range(PROCESSES)]

    results = await run_processes(database_url, account, job_lists)

    reserved = [job for r in results for job in r["new"]]  # type: ignore[attr-defined]
    assert sorted(reserved) == sorted(shared)  # each job reserved by exactly one process
    balance = await CreditStore(pool).balance(account)
    assert (balance.available, balance.reserved) == (300, 200)
    count = await pool.fetchval("SELECT count(*) FROM reservations WHERE account_id = $1", account)
    assert count == 200
    assert await run_audit(pool) == []
