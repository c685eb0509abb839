"""Several OS processes beginning jobs on one guarded account at once never pass a guard, not by
one credit: every guard is decided under the account's row lock, in the reservation's
transaction."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import asyncpg

from dispatcher.credits.audit import run_audit
from dispatcher.credits.guards import GuardSettings, load_guards
from dispatcher.credits.ledger import CreditStore
from tests.integration.guards_helpers import guarded_account, reserved_today

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 4
TASKS_PER_PROCESS = 6
JOBS_PER_PROCESS = 60


def run_processes(dsn: str, account: str, priorities: list[str]) -> Counter[str]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.integration.guard_worker", dsn, account,
             str(TASKS_PER_PROCESS), priority,
             *[f"{account}-p{p}-j{i}" for i in range(JOBS_PER_PROCESS)]],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for p, priority in enumerate(priorities)
    ]
    total: Counter[str] = Counter()
    for proc in procs:
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0
        total.update(json.loads(out))
    return total


async def test_concurrent_processes_reach_the_daily_cap_exactly(
        pool: asyncpg.Pool, database_url: str) -> None:
    cap = 97
    account = await guarded_account(pool, 10_000, GuardSettings(daily_spend_cap=cap))
    outcomes = run_processes(database_url, account, ["bulk", "transactional"] * 2)
    assert outcomes == {"send": cap, "held": PROCESSES * JOBS_PER_PROCESS - cap}
    assert await reserved_today(pool, account) == cap
    assert (await CreditStore(pool).balance(account)).reserved == cap
    assert (await load_guards(pool, account)).spent_today == cap
    assert await run_audit(pool) == []


async def test_concurrent_processes_stop_bulk_at_the_velocity_threshold_exactly(
        pool: asyncpg.Pool, database_url: str) -> None:
    account = await guarded_account(pool, 10_000, GuardSettings(
        velocity_window_seconds=3600, velocity_multiple=4, velocity_min_credits=10))
    await pool.execute("UPDATE account_guards SET usual_per_window = 20, window_start = now()"
                       " WHERE account_id = $1", account)
    outcomes = run_processes(database_url, account, ["bulk"] * PROCESSES)
    assert outcomes == {"send": 80, "held": PROCESSES * JOBS_PER_PROCESS - 80}
    assert await reserved_today(pool, account) == 80


async def test_concurrent_transactional_jobs_stop_at_the_overdraft_exactly(
        pool: asyncpg.Pool, database_url: str) -> None:
    account = await guarded_account(pool, 50, GuardSettings(transactional_overdraft=30))
    outcomes = run_processes(database_url, account, ["transactional"] * PROCESSES)
    assert outcomes == {"send": 80, "held": PROCESSES * JOBS_PER_PROCESS - 80}
    balance = await CreditStore(pool).balance(account)
    assert (balance.available, balance.debt, balance.reserved) == (-30, 30, 80)
    assert await run_audit(pool) == []


async def test_concurrent_bulk_never_spends_the_transactional_reserve(
        pool: asyncpg.Pool, database_url: str) -> None:
    account = await guarded_account(pool, 150, GuardSettings(transactional_reserve=40))
    outcomes = run_processes(database_url, account, ["bulk"] * PROCESSES)
    assert outcomes["send"] == 110
    assert (await CreditStore(pool).balance(account)).available == 40
    assert await run_audit(pool) == []
