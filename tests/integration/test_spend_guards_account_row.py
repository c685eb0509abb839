"""Spend guards kept on the accounts row (migration 0031): the counters written by the
reservation's own UPDATE, a UTC day roll-over, the audit's cap check, and the data migration
from 0023's account_guards table."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from dispatcher.credits.audit import run_audit
from dispatcher.credits.guards import GuardSettings, load_guards, set_guards
from dispatcher.migrate import available_migrations
from dispatcher.queries import q
from tests.conftest import ADMIN_DSN, dsn_for
from tests.integration.guards_helpers import begin, guarded_account, reserved_today, uid

COUNTERS = ("SELECT guards_set, spent_day = (now() AT TIME ZONE 'UTC')::date AS today,"
            " spent_today, window_spent, capped_until, velocity_held_at"
            " FROM accounts WHERE id = $1")


async def test_one_job_counts_on_the_account_row_in_the_reservations_update(
        pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 100, GuardSettings(
        daily_spend_cap=50, velocity_window_seconds=3600, velocity_multiple=10.0,
        velocity_min_credits=1000))
    for _ in range(4):
        assert (await begin(pool, account, 3))[1].outcome == "send"
    row = await pool.fetchrow(COUNTERS, account)
    assert dict(row) == {"guards_set": True, "today": True, "spent_today": 12,
                         "window_spent": 12, "capped_until": None, "velocity_held_at": None}
    assert (await load_guards(pool, account)).spent_today == 12
    # One guarded one-job reservation: one UPDATE of one row (the account's), the balance and
    # the counters in the same statement.
    updates = ("SELECT coalesce(sum(n_tup_upd), 0) FROM pg_stat_xact_user_tables"
               " WHERE relname IN ('accounts', 'account_guards')")
    async with pool.acquire() as conn, conn.transaction():
        before = await conn.fetchval(updates)
        rows = await conn.fetch(q("reserve_guarded"), account, ["bulk"], [uid("job")], [2],
                                ["US"])
        assert [r["status"] for r in rows] == ["reserved"]
        assert await conn.fetchval(updates) - before == 1
    assert (await pool.fetchrow(COUNTERS, account))["spent_today"] == 14


async def test_counters_on_the_account_row_roll_over_to_a_new_utc_day(pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 100, GuardSettings(daily_spend_cap=10))
    for _ in range(3):
        assert (await begin(pool, account, 3))[1].outcome == "send"
    assert (await begin(pool, account, 3))[1].outcome == "held"
    # As if all that had been reserved yesterday (UTC): the counter and the cap belong to a day
    # that has ended.
    await pool.execute("UPDATE accounts SET spent_day = spent_day - 1,"
                       " capped_until = capped_until - interval '1 day' WHERE id = $1", account)
    assert (await load_guards(pool, account)).spent_today == 0
    assert account in {r["id"] for r in await pool.fetch(q("guard_held_accounts_due"))}
    # release_held gives back the held job; today's counter starts from it.
    released = await pool.fetch(q("release_held"), account, 100)
    assert [r["outcome"] for r in released] == ["released"]
    row = await pool.fetchrow(COUNTERS, account)
    assert (row["today"], row["spent_today"], row["capped_until"]) == (True, 3, None)
    # A new one-job reservation counts on top, on the same row.
    assert (await begin(pool, account, 4))[1].outcome == "send"
    assert (await pool.fetchrow(COUNTERS, account))["spent_today"] == 7
    assert (await begin(pool, account, 4))[1].outcome == "held"  # 7 + 4 > 10
    assert (await load_guards(pool, account)).spent_today == 7


async def test_audit_still_sees_a_forced_cap_breach(pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 100, GuardSettings(daily_spend_cap=10))
    # The cap was set before today began (the first day's spend before it is bound by no cap).
    await pool.execute("UPDATE guard_cap_history SET set_at = set_at - interval '2 days'"
                       " WHERE account_id = $1", account)
    while (await begin(pool, account, 3))[1].outcome == "send":
        pass
    assert await reserved_today(pool, account) == 9
    assert [v for v in await run_audit(pool) if v.account_id == account] == []
    # Forced past the guards (reserve_batch itself does not look at them): the audit sees it.
    rows = await pool.fetch(q("reserve_batch"), account, [uid("job")], [5])
    assert [r["status"] for r in rows] == ["reserved"]
    found = [v for v in await run_audit(pool) if v.account_id == account]
    assert [v.check for v in found] == ["audit_daily_spend_caps"]
    assert "reserved 14 credits" in found[0].problem and "cap of 10" in found[0].problem


async def test_a_cap_change_is_kept_in_the_cap_history(pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 0, GuardSettings(daily_spend_cap=10))
    await guarded_account(pool, 0, GuardSettings())
    assert await set_guards(pool, account, GuardSettings(daily_spend_cap=10,
                                                         max_credits_per_message=5))
    assert await set_guards(pool, account, GuardSettings(daily_spend_cap=20))
    assert await set_guards(pool, account, GuardSettings())
    caps = await pool.fetch("SELECT daily_spend_cap FROM guard_cap_history"
                            " WHERE account_id = $1 ORDER BY id", account)
    assert [r["daily_spend_cap"] for r in caps] == [None, 10, 20, None]


@pytest.fixture
async def bare_database() -> AsyncIterator[str]:
    """An empty database (no migration applied), dropped after."""
    name = f"dispatcher_t_0031_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield name
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_migration_0031_moves_settings_and_counters(bare_database: str) -> None:
    migrations = available_migrations()
    names = [name for name, _ in migrations]
    at = names.index("0031_guards_on_account_row.sql")
    conn = await asyncpg.connect(dsn_for(bare_database))
    try:
        for _, sql in migrations[:at]:
            await conn.execute(sql)
        await conn.execute("INSERT INTO accounts (id) VALUES ('guarded'), ('plain')")
        await conn.execute(
            "SELECT guard_settings_set('guarded', 50, ARRAY['GB','US'], 9, 60, 3, 7, 2, 1)")
        await conn.execute(
            "UPDATE account_guards SET spent_day = (now() AT TIME ZONE 'UTC')::date,"
            " spent_today = 50, capped_until = now() + interval '1 hour',"
            " window_start = now(), window_spent = 6, usual_per_window = 2.5,"
            " velocity_held_at = now() WHERE account_id = 'guarded'")
        before = dict(await conn.fetchrow("SELECT * FROM account_guards"))
        history = await conn.fetchval("SELECT count(*) FROM guard_cap_history")
        await conn.execute(migrations[at][1])
        assert dict(await conn.fetchrow("SELECT * FROM account_guards")) == before
        assert await conn.fetchval("SELECT count(*) FROM guard_cap_history") == history
        flags = await conn.fetch("SELECT id, guards_set FROM accounts ORDER BY id")
        assert [(r["id"], r["guards_set"]) for r in flags] == [("guarded", True),
                                                              ("plain", False)]
        # Still capped and velocity-held after the move: a bulk job is held.
        rows = await conn.fetch(q("reserve_guarded"), "guarded", ["bulk"], ["j1"], [1], ["US"])
        assert [r["status"] for r in rows] == ["daily_cap"]
    finally:
        await conn.close()


async def test_a_batch_counts_only_what_it_reserved(pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 100, GuardSettings(
        daily_spend_cap=50, velocity_window_seconds=3600, velocity_multiple=10.0,
        velocity_min_credits=1000))
    first = uid("job")
    rows = await pool.fetch(q("reserve_guarded"), account, ["bulk"], [first], [4], ["US"])
    assert [r["status"] for r in rows] == ["reserved"]
    # A batch that passes every guard, one job of it reserved already: counted once.
    ids = [first, uid("job"), uid("job")]
    rows = await pool.fetch(q("reserve_guarded"), account, ["bulk"] * 3, ids, [4, 2, 3],
                            ["US"] * 3)
    assert [r["status"] for r in rows] == ["existing", "reserved", "reserved"]
    row = await pool.fetchrow(COUNTERS, account)
    assert (row["spent_today"], row["window_spent"]) == (9, 9)
    assert await reserved_today(pool, account) == 9
