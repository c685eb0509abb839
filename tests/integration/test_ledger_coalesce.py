"""Concurrent ``reserve_many`` calls on one account share round trips, each getting its own rows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.credits.audit import run_audit
from dispatcher.credits.coalesce import reserve_coalesced
from dispatcher.credits.ledger import BatchReservation, CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.errors import InvalidAmount, ReservationConflict
from dispatcher.queries import q


class Recording:
    """A pool that records every ``reserve_batch`` it runs; optionally held at a gate or failing."""

    def __init__(self, pool: asyncpg.Pool, *, poison: str | None = None) -> None:
        self.pool = pool
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.poison = poison

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        if query == q("reserve_batch"):
            self.batches.append(list(args[1]))
            await self.gate.wait()
            if self.poison in args[1]:
                raise asyncpg.UniqueViolationError("duplicate key value (simulated race)")
        return await self.pool.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await self.pool.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self.pool.fetchval(query, *args)


async def funded(pool: asyncpg.Pool, credits: int) -> str:
    account = f"co-{uuid.uuid4().hex[:10]}"
    await create_account(pool, account)
    if credits:
        await CreditStore(pool).grant(account, credits, "purchase", f"{account}-pay")
    return account


async def test_concurrent_callers_share_batches_and_get_exactly_their_own(
        pool: asyncpg.Pool) -> None:
    account = await funded(pool, 10_000)
    db = Recording(pool)
    store = CreditStore(db, coalesce=True)
    calls = [[(f"{account}-c{c}-j{j}", 1 + (c + j) % 3) for j in range(10)] for c in range(20)]

    results = await asyncio.gather(*(store.reserve_many(account, jobs) for jobs in calls))

    for jobs, result in zip(calls, results, strict=True):
        assert result.reserved == [job for job, _ in jobs]
        assert (result.existing, result.insufficient, result.conflicts) == ([], [], [])
    # All 20 queued before the lane's task first ran: one round trip for all of them.
    assert [len(b) for b in db.batches] == [200]
    total = sum(a for jobs in calls for _, a in jobs)
    assert results[-1].available == 10_000 - total
    count = await pool.fetchval("SELECT count(*) FROM reservations WHERE account_id = $1",
                                account)
    assert count == 200
    balance = await CreditStore(pool).balance(account)
    assert (balance.available, balance.reserved) == (10_000 - total, total)
    assert await run_audit(pool) == []


async def test_default_pool_store_coalesces_and_never_double_reserves(
        pool: asyncpg.Pool) -> None:
    """32 callers over the real pool, half their job ids shared: each id reserved exactly once."""
    account = await funded(pool, 600)
    store = CreditStore(pool)  # a pool: coalescing on by default
    shared = [f"{account}-s{i}" for i in range(50)]
    calls = [[(f"{account}-c{c}-j{j}", 1) for j in range(10)] + [(s, 1) for s in shared[c::8]]
             for c in range(32)]

    results = await asyncio.gather(*(store.reserve_many(account, jobs) for jobs in calls))

    reserved = [job for r in results for job in r.reserved]
    assert len(reserved) == len(set(reserved)) == 320 + 50
    for jobs, result in zip(calls, results, strict=True):
        assert sorted(result.reserved + result.existing) == sorted(job for job, _ in jobs)
    assert (await CreditStore(pool).balance(account)).available == 600 - 370
    assert await run_audit(pool) == []


def serial_expectation(funds: int, calls: list[list[tuple[str, int]]],
                       foreign: set[str]) -> list[tuple[object, ...]]:
    """What each caller gets when the callers run one after another (the ledger's rules)."""
    available, taken = funds, set()
    out: list[tuple[object, ...]] = []
    for jobs in calls:
        res: dict[str, list[str]] = {"r": [], "e": [], "i": [], "c": []}
        exhausted = False
        for job, amount in jobs:
            if job in foreign:
                res["c"].append(job)
            elif job in taken:
                res["e"].append(job)
            elif exhausted or amount > available:
                exhausted = True
                res["i"].append(job)
            else:
                available -= amount
                taken.add(job)
                res["r"].append(job)
        out.append((res["r"], res["e"], res["i"], res["c"], available))
    return out


def as_tuple(b: BatchReservation) -> tuple[object, ...]:
    return (b.reserved, b.existing, b.insufficient, b.conflicts, b.available)


class Loop:
    """An event loop and a pool for the synchronous hypothesis test."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(self._open(dsn))
        self.other = self.loop.run_until_complete(funded(self.pool, 1000))

    @staticmethod
    async def _open(dsn: str) -> asyncpg.Pool:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        assert pool is not None
        return pool

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.close())
        self.loop.close()


@pytest.fixture
def loop_pool(database_url: str) -> Iterator[Loop]:
    lp = Loop(database_url)
    yield lp
    lp.close()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(funds=st.integers(0, 40),
       calls=st.lists(st.lists(st.tuples(st.sampled_from([f"j{i}" for i in range(8)] + ["x"]),
                                         st.integers(1, 12)), min_size=1, max_size=5),
                      min_size=2, max_size=6))
def test_callers_get_what_a_serial_run_gives_them(
        loop_pool: Loop, funds: int, calls: list[list[tuple[str, int]]]) -> None:
    """Credits running out inside a shared batch never leak into the next caller's answer."""
    async def scenario() -> tuple[list[BatchReservation], list[list[tuple[str, int]]], set[str]]:
        account = await funded(loop_pool.pool, funds)
        foreign = f"{account}-x"
        await CreditStore(loop_pool.pool).reserve(foreign, loop_pool.other, 1)
        real = [[(f"{account}-{name}", amount) for name, amount in jobs] for jobs in calls]
        store = CreditStore(Recording(loop_pool.pool), coalesce=True)
        results = await asyncio.gather(*(store.reserve_many(account, jobs) for jobs in real))
        violations = [v for v in await run_audit(loop_pool.pool) if v.account_id == account]
        assert violations == []
        return list(results), real, {foreign}

    results, real, foreign = loop_pool.loop.run_until_complete(scenario())
    assert [as_tuple(r) for r in results] == serial_expectation(funds, real, foreign)


async def test_a_caller_cancelled_while_waiting_reserves_nothing(pool: asyncpg.Pool) -> None:
    account = await funded(pool, 100)
    db = Recording(pool)
    store = CreditStore(db, coalesce=True)
    db.gate.clear()
    first = asyncio.create_task(store.reserve_many(account, [(f"{account}-a", 1)]))
    await asyncio.sleep(0.02)  # its batch is in flight (held at the gate)
    waiting = asyncio.create_task(store.reserve_many(account, [(f"{account}-b", 1)]))
    third = asyncio.create_task(store.reserve_many(account, [(f"{account}-c", 1)]))
    await asyncio.sleep(0.05)
    waiting.cancel()
    db.gate.set()

    assert (await first).reserved == [f"{account}-a"]
    assert (await third).reserved == [f"{account}-c"]
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert db.batches == [[f"{account}-a"], [f"{account}-c"]]
    assert await pool.fetchval("SELECT count(*) FROM reservations WHERE account_id = $1",
                               account) == 2


async def test_a_foreign_id_race_fails_only_its_own_caller(pool: asyncpg.Pool) -> None:
    account = await funded(pool, 100)
    db = Recording(pool, poison=f"{account}-raced")
    store = CreditStore(db, coalesce=True)
    db.gate.clear()
    first = asyncio.create_task(store.reserve_many(account, [(f"{account}-a", 1)]))
    await asyncio.sleep(0.02)
    raced = asyncio.create_task(store.reserve_many(account, [(f"{account}-raced", 1)]))
    last = asyncio.create_task(store.reserve_many(account, [(f"{account}-c", 1)]))
    await asyncio.sleep(0.05)
    db.gate.set()

    assert (await first).reserved == [f"{account}-a"]
    with pytest.raises(ReservationConflict):
        await raced
    assert (await last).reserved == [f"{account}-c"]
    # The shared batch failed as a whole, then each of its callers went alone.
    assert db.batches == [[f"{account}-a"], [f"{account}-raced", f"{account}-c"],
                          [f"{account}-raced"], [f"{account}-c"]]


async def test_other_failures_reach_every_caller_of_the_batch_and_the_lane_recovers() -> None:
    sent: list[list[str]] = []

    async def fetch(account: str, ids: list[str], amounts: list[int]) -> list[Any]:
        sent.append(ids)
        await asyncio.sleep(0.01)
        if "boom" in ids:
            raise OSError("connection lost")
        return [{"job_id": i, "status": "reserved", "amount": a, "available": 0}
                for i, a in zip(ids, amounts, strict=True)]

    owner = object()
    calls = [["a"], ["boom"], ["b"], ["c", "d", "e"], ["f"]]
    results = await asyncio.gather(
        *(reserve_coalesced(owner, "acct", ids, [1] * len(ids), fetch, max_jobs=3)
          for ids in calls), return_exceptions=True)

    assert sent == [["a", "boom", "b"], ["c", "d", "e"], ["f"]]  # at most 3 jobs per batch
    assert all(isinstance(r, OSError) for r in results[:3])
    answered = [r for r in results[3:] if isinstance(r, list)]
    assert [[row["job_id"] for row in r] for r in answered] == [["c", "d", "e"], ["f"]]
    later = await reserve_coalesced(owner, "acct", ["g"], [1], fetch)
    assert [r["job_id"] for r in later] == ["g"]


async def test_bad_batches_are_refused_before_the_database(pool: asyncpg.Pool) -> None:
    account = await funded(pool, 10)
    store = CreditStore(pool)
    before = await pool.fetchval("SELECT count(*) FROM ledger")
    for jobs in ([], [(f"{account}-a", 1), (f"{account}-b", 0)], [(f"{account}-c", -2)],
                 [(f"{account}-d", 1.5)]):
        with pytest.raises(InvalidAmount):
            await store.reserve_many(account, jobs)  # type: ignore[arg-type]
    await store.reserve(f"{account}-e", account, 2)
    with pytest.raises(InvalidAmount):
        await store.capture(f"{account}-e", -1)
    with pytest.raises(InvalidAmount):
        await store.refund(account, f"{account}-pay", 0, f"{account}-r")
    assert await pool.fetchval("SELECT count(*) FROM ledger") == before + 1  # the reserve only
    assert (await store.balance(account)).available == 8
