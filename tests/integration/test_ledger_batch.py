"""The set-based ``reserve_batch`` (migration 0006) answers and writes exactly what 0001's did."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.errors import DispatcherError

OLD = "reserve_batch_0001"
NAMES = [f"j{i}" for i in range(8)]
FOREIGN = ["x0", "x1"]  # reserved by another account before the batch


def old_reserve_batch_sql() -> str:
    """0001's reserve_batch, as it was, under another name: the oracle."""
    text = resources.files("dispatcher").joinpath(
        "sql", "migrations", "0001_ledger.sql").read_text(encoding="utf-8")
    match = re.search(r"CREATE FUNCTION reserve_batch\(.*?\nEND \$\$;", text, re.DOTALL)
    assert match is not None
    return match.group(0).replace("FUNCTION reserve_batch(", f"FUNCTION {OLD}(", 1)


async def snapshot(conn: asyncpg.Connection, account: str, ids: list[str],
                   ledger_floor: int) -> dict[str, Any]:
    """Everything a batch can change, without ids or timestamps that differ between runs."""
    acct = await conn.fetchrow(
        "SELECT sub_available, purchased_available, debt, reserved FROM accounts WHERE id = $1",
        account)
    buckets = await conn.fetch(
        "SELECT id, remaining FROM credit_buckets WHERE account_id = $1 ORDER BY id", account)
    reservations = await conn.fetch(
        "SELECT job_id, account_id, amount, sub_part, period_seq, bucket_ids, bucket_parts, "
        "status, captured FROM reservations WHERE job_id = ANY($1) ORDER BY job_id", ids)
    ledger = await conn.fetch(
        "SELECT account_id, kind, reference, sub_delta, purchased_delta, debt_delta, "
        "reserved_delta, bucket_ids, bucket_deltas, forfeited, amount, job_id "
        "FROM ledger WHERE id > $1 ORDER BY id", ledger_floor)
    assert acct is not None
    return {"account": tuple(acct), "buckets": [tuple(r) for r in buckets],
            "reservations": [tuple(r) for r in reservations],
            "ledger": [tuple(r) for r in ledger]}


async def run_and_roll_back(conn: asyncpg.Connection, function: str, account: str,
                            ids: list[str], amounts: list[int]) -> dict[str, Any]:
    floor = int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM ledger"))
    tx = conn.transaction()
    await tx.start()
    try:
        rows = await conn.fetch(
            f"SELECT job_id, status, amount, available FROM {function}($1, $2, $3)",
            account, ids, amounts)
        return {"rows": [tuple(r) for r in rows], **await snapshot(conn, account, ids, floor)}
    except asyncpg.PostgresError as exc:
        return {"error": str(exc)}
    finally:
        await tx.rollback()


# Operations that bring an account into a random state: (op, job index, amount).
ops = st.lists(st.tuples(st.sampled_from(["grant", "reserve", "capture", "release", "renew"]),
                         st.integers(0, len(NAMES) - 1), st.integers(0, 25)), max_size=10)
batches = st.lists(st.tuples(st.sampled_from(NAMES + FOREIGN), st.integers(1, 15)),
                   min_size=1, max_size=10)


class Harness:
    """An event loop and a connection for the synchronous hypothesis test."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(dsn))
        self.loop.run_until_complete(self.conn.execute(old_reserve_batch_sql()))
        self.other = self.loop.run_until_complete(self._new_account(10**6))

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()

    async def _new_account(self, purchased: int = 0) -> str:
        account = f"b-{uuid.uuid4().hex[:12]}"
        await create_account(self.conn, account)
        if purchased:
            await CreditStore(self.conn).grant(account, purchased, "purchase", f"{account}-p")
        return account

    async def prepare(self, steps: list[tuple[str, int, int]]) -> tuple[str, dict[str, str]]:
        """A fresh account after ``steps``, and the real job id of every name in the batch."""
        account = await self._new_account()
        store = CreditStore(self.conn)
        jobs = {name: f"{account}-{name}" for name in NAMES}
        for name in FOREIGN:
            jobs[name] = f"{account}-{name}"
            await store.reserve(jobs[name], self.other, 1)
        now = datetime.now(UTC)
        for n, (op, job, amount) in enumerate(steps):
            job_id = jobs[NAMES[job]]
            try:
                if op == "grant" and amount:
                    await store.grant(account, amount, "purchase", f"{account}-g{n}")
                elif op == "reserve" and amount:
                    await store.reserve(job_id, account, amount)
                elif op == "capture":
                    await store.capture(job_id, amount)  # above the estimate: into debt
                elif op == "release":
                    await store.release(job_id)
                elif op == "renew":
                    await store.start_period(account, amount, f"{account}-p{n}", now,
                                             now + timedelta(days=30))
            except DispatcherError:
                pass
        return account, jobs


@pytest.fixture
def harness(database_url: str) -> Iterator[Harness]:
    h = Harness(database_url)
    yield h
    h.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=ops, batch=batches)
def test_set_based_batch_matches_the_0001_function(
        harness: Harness, steps: list[tuple[str, int, int]], batch: list[tuple[str, int]]) -> None:
    run = harness.loop.run_until_complete
    account, jobs = run(harness.prepare(steps))
    ids = [jobs[name] for name, _ in batch]
    amounts = [amount for _, amount in batch]

    old = run(run_and_roll_back(harness.conn, OLD, account, ids, amounts))
    new = run(run_and_roll_back(harness.conn, "reserve_batch", account, ids, amounts))

    assert new == old
    run(harness.conn.fetch("SELECT * FROM reserve_batch($1, $2, $3)", account, ids, amounts))
    assert [v for v in run(run_audit(harness.conn)) if v.account_id == account] == []


async def test_mixed_batch_writes_the_expected_rows(pool: asyncpg.Pool) -> None:
    """Subscription + two buckets, an in-batch duplicate, a replay, a foreign id, a short tail."""
    account, other = f"mix-{uuid.uuid4().hex[:8]}", f"mixo-{uuid.uuid4().hex[:8]}"
    store = CreditStore(pool)
    for name in (account, other):
        await create_account(pool, name)
    now = datetime.now(UTC)
    await store.start_period(account, 5, f"{account}-p1", now, now + timedelta(days=30))
    await store.grant(account, 4, "purchase", f"{account}-b1")
    await store.grant(account, 6, "auto_recharge", f"{account}-b2")
    await store.grant(other, 10, "purchase", f"{other}-b")
    await store.reserve(f"{account}-prior", account, 2)  # subscription 5 -> 3
    await store.reserve(f"{account}-foreign", other, 1)
    b1, b2 = [r["id"] for r in await pool.fetch(
        "SELECT id FROM credit_buckets WHERE account_id = $1 ORDER BY id", account)]
    floor = await pool.fetchval("SELECT max(id) FROM ledger")
    j = {n: f"{account}-{n}" for n in ("j1", "j2", "j3", "j4", "j5", "prior", "foreign")}

    rows = await pool.fetch(
        "SELECT job_id, status, amount, available FROM reserve_batch($1, $2, $3)", account,
        [j["j1"], j["j2"], j["j1"], j["prior"], j["foreign"], j["j3"], j["j4"], j["j5"]],
        [2, 3, 9, 7, 1, 4, 5, 1])

    assert [tuple(r) for r in rows] == [
        (j["j1"], "reserved", 2, 11), (j["j2"], "reserved", 3, 8), (j["j1"], "existing", 2, 8),
        (j["prior"], "existing", 2, 8), (j["foreign"], "conflict", 1, 8),
        (j["j3"], "reserved", 4, 4), (j["j4"], "insufficient", 5, 4),
        (j["j5"], "insufficient", 1, 4)]
    reservations = await pool.fetch(
        "SELECT job_id, amount, sub_part, bucket_ids, bucket_parts FROM reservations "
        "WHERE job_id = ANY($1) ORDER BY job_id", [j["j1"], j["j2"], j["j3"], j["j4"], j["j5"]])
    assert [tuple(r) for r in reservations] == [
        (j["j1"], 2, 2, [], []), (j["j2"], 3, 1, [b1], [2]), (j["j3"], 4, 0, [b1, b2], [2, 2])]
    ledger = await pool.fetch(
        "SELECT reference, sub_delta, purchased_delta, reserved_delta, bucket_ids, bucket_deltas "
        "FROM ledger WHERE id > $1 ORDER BY id", floor)
    assert [tuple(r) for r in ledger] == [
        (f"reserve:{j['j1']}", -2, 0, 2, [], []),
        (f"reserve:{j['j2']}", -1, -2, 3, [b1], [-2]),
        (f"reserve:{j['j3']}", 0, -4, 4, [b1, b2], [-2, -2])]
    balance = await store.balance(account)
    assert (balance.subscription, balance.purchased, balance.reserved) == (0, 4, 11)
    assert [tuple(r) for r in await pool.fetch(
        "SELECT id, remaining FROM credit_buckets WHERE account_id = $1 ORDER BY id",
        account)] == [(b1, 0), (b2, 4)]
    assert await run_audit(pool) == []


async def test_bad_amount_raises_and_writes_nothing(pool: asyncpg.Pool) -> None:
    account = f"bad-{uuid.uuid4().hex[:8]}"
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 10, "purchase", f"{account}-b")
    before = await pool.fetchval("SELECT count(*) FROM ledger")
    with pytest.raises(asyncpg.RaiseError, match="amount must be positive, got 0"):
        await pool.fetch("SELECT * FROM reserve_batch($1, $2, $3)", account,
                         [f"{account}-a", f"{account}-b"], [1, 0])
    with pytest.raises(asyncpg.RaiseError, match="2 job ids but 1 amounts"):
        await pool.fetch("SELECT * FROM reserve_batch($1, $2, $3)", account,
                         [f"{account}-a", f"{account}-b"], [1])
    assert await pool.fetchval("SELECT count(*) FROM ledger") == before
    assert (await CreditStore(pool).balance(account)).available == 10
