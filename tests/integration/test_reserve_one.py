"""The one-job ``reserve_one`` (migration 0028) answers and writes exactly what the set-based
``reserve_batch_set`` and 0001's ``reserve_batch`` do for a batch of one job."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from tests.integration.test_ledger_batch import (
    FOREIGN,
    NAMES,
    OLD,
    Harness,
    ops,
    run_and_roll_back,
)


@pytest.fixture
def harness(database_url: str) -> Iterator[Harness]:
    h = Harness(database_url)
    yield h
    h.close()


one_job = st.tuples(st.sampled_from(NAMES + FOREIGN), st.integers(1, 40))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=ops, job=one_job)
def test_one_job_matches_the_set_based_and_0001_functions(
        harness: Harness, steps: list[tuple[str, int, int]], job: tuple[str, int]) -> None:
    run = harness.loop.run_until_complete
    account, jobs = run(harness.prepare(steps))
    ids, amounts = [jobs[job[0]]], [job[1]]

    old = run(run_and_roll_back(harness.conn, OLD, account, ids, amounts))
    set_based = run(run_and_roll_back(harness.conn, "reserve_batch_set", account, ids, amounts))
    fast = run(run_and_roll_back(harness.conn, "reserve_batch", account, ids, amounts))

    assert fast == set_based == old
    run(harness.conn.fetch("SELECT * FROM reserve_batch($1, $2, $3)", account, ids, amounts))
    assert [v for v in run(run_audit(harness.conn)) if v.account_id == account] == []


async def test_one_job_edge_cases_answer_as_the_set_based_one(pool: asyncpg.Pool) -> None:
    """Unknown account (before the amount check), a bad amount, a replay, and the promise the
    buckets cannot keep."""
    account = f"one-{uuid.uuid4().hex[:8]}"
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 10, "purchase", f"{account}-b")
    rows = await pool.fetch("SELECT * FROM reserve_batch($1, $2, $3)", "nobody-here",
                            ["n-1"], [0])
    assert [tuple(r) for r in rows] == [("n-1", "unknown_account", 0, 0)]
    with pytest.raises(asyncpg.RaiseError, match="amount must be positive, got 0"):
        await pool.fetch("SELECT * FROM reserve_batch($1, $2, $3)", account, ["a"], [0])
    first = await pool.fetch("SELECT * FROM reserve_batch($1, $2, $3)", account,
                             [f"{account}-1"], [4])
    again = await pool.fetch("SELECT * FROM reserve_batch($1, $2, $3)", account,
                             [f"{account}-1"], [9])
    assert [tuple(r) for r in first] == [(f"{account}-1", "reserved", 4, 6)]
    assert [tuple(r) for r in again] == [(f"{account}-1", "existing", 4, 6)]
    async with pool.acquire() as conn:
        # A bucket emptied behind the account's back: its promise cannot be kept.
        await conn.execute("UPDATE credit_buckets SET remaining = 0 WHERE account_id = $1",
                           account)
        for function in ("reserve_batch", "reserve_batch_set"):
            with pytest.raises(asyncpg.RaiseError, match="insufficient credits for " + account):
                await conn.fetch(f"SELECT * FROM {function}($1, $2, $3)", account,
                                 [f"{account}-2"], [3])
