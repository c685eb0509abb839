"""Spend guards on single jobs (begin_job) and on release from hold, against real PostgreSQL."""

from __future__ import annotations

import asyncpg

from dispatcher.credits.audit import run_audit
from dispatcher.credits.guards import GuardSettings, load_guards, release_velocity, set_guards
from dispatcher.credits.ledger import CreditStore
from dispatcher.jobs.store import JobStore
from dispatcher.queries import q
from tests.integration.guards_helpers import (
    begin,
    events,
    guarded_account,
    job_row,
    reserved_today,
    start_next_utc_day,
)


async def release(pool: asyncpg.Pool, account: str) -> list[str]:
    """What the resumer's release_held gives back, by outcome."""
    rows = await pool.fetch(q("release_held"), account, 100)
    return [r["job_id"] or r["outcome"] for r in rows]


async def test_no_guards_reserve_as_before(pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 5, GuardSettings())
    outcomes = [(await begin(pool, account))[1].outcome for _ in range(6)]
    assert outcomes == ["send"] * 5 + ["held"]


async def test_daily_cap_holds_exactly_at_the_cap_then_releases_next_utc_day(
        pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 100, GuardSettings(daily_spend_cap=10))
    begun = [await begin(pool, account, 3) for _ in range(5)]
    assert [b.outcome for _, b in begun] == ["send"] * 3 + ["held"] * 2
    # 9 reserved; a 1-credit job still fits under 10, but it waits behind the held ones.
    late, late_begin = await begin(pool, account, 1)
    assert late_begin.outcome == "held"
    assert await reserved_today(pool, account) == 9
    held = [job for job, _ in begun[3:]] + [late]
    assert [(await job_row(pool, j))["reason"] for j in held] == ["daily_cap"] * 3
    state = await load_guards(pool, account)
    assert (state.spent_today, state.remaining_today()) == (9, 1)
    assert state.capped_until is not None
    assert [e["routing_key"] for e in await events(pool, account)] == ["account.capped"]
    held_events = await events(pool, account, "status.sms.held")
    assert {e["reason"] for e in held_events} == {"daily_cap"}
    # Still today: nothing is released, and the sweep does not pick it up.
    assert await release(pool, account) == ["still_paused"]
    assert account not in {r["id"] for r in await pool.fetch(q("guard_held_accounts_due"))}

    await start_next_utc_day(pool, account)
    assert account in {r["id"] for r in await pool.fetch(q("guard_held_accounts_due"))}
    assert await release(pool, account) == held
    assert [e["routing_key"] for e in await events(pool, account)] == [
        "account.capped", "account.uncapped"]
    assert (await load_guards(pool, account)).spent_today == 7
    assert await run_audit(pool) == []


async def test_country_outside_allowlist_is_refused_and_never_charged(pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 10, GuardSettings(allowed_countries=("US", "CA")))
    _, ok = await begin(pool, account, 2, country="CA")
    job, refused = await begin(pool, account, 2, country="GB")
    assert (ok.outcome, refused.outcome) == ("send", "country_not_allowed")
    assert await job_row(pool, job) is None
    assert (await CreditStore(pool).balance(account)).available == 8


async def test_price_above_limit_is_refused_before_reserving(pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 10, GuardSettings(max_credits_per_message=3))
    _, ok = await begin(pool, account, 3)
    _, refused = await begin(pool, account, 4, priority="transactional")
    assert (ok.outcome, refused.outcome) == ("send", "price_above_limit")
    assert (await CreditStore(pool).balance(account)).available == 7


async def test_velocity_holds_bulk_at_the_threshold_and_an_owner_releases_it(
        pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 1000, GuardSettings(
        velocity_window_seconds=60, velocity_multiple=3, velocity_min_credits=5))
    # The usual rate: 4 credits per window, so the threshold is max(3 x 4, 5) = 12.
    await pool.execute("UPDATE account_guards SET usual_per_window = 4, window_start = now()"
                       " WHERE account_id = $1", account)
    bulk = [await begin(pool, account, 1) for _ in range(15)]
    assert [b.outcome for _, b in bulk] == ["send"] * 12 + ["held"] * 3
    assert await reserved_today(pool, account) == 12
    # Transactional work goes on; the hold is on bulk only.
    _, otp = await begin(pool, account, 1, priority="transactional")
    assert otp.outcome == "send"
    assert [e["routing_key"] for e in await events(pool, account)] == ["account.velocity_held"]
    velocity_event = (await events(pool, account))[0]
    assert (velocity_event["threshold"], velocity_event["window_spent"]) == (12, 12)
    assert await release(pool, account) == ["still_paused"]

    assert await release_velocity(pool, account)
    assert not await release_velocity(pool, account)
    assert account in {r["id"] for r in await pool.fetch(q("guard_held_accounts_due"))}
    assert await release(pool, account) == [job for job, _ in bulk[12:]]
    assert [e["routing_key"] for e in await events(pool, account)] == [
        "account.velocity_held", "account.velocity_released"]
    assert await run_audit(pool) == []


async def test_bulk_stops_at_the_transactional_reserve_and_transactional_uses_it(
        pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 10, GuardSettings(transactional_reserve=4))
    bulk = [await begin(pool, account, 2) for _ in range(4)]
    assert [b.outcome for _, b in bulk] == ["send"] * 3 + ["held"]
    # Bulk stopped at the floor exactly as at zero: the account is paused, billing told.
    assert await pool.fetchval("SELECT paused_at IS NOT NULL FROM accounts WHERE id = $1",
                               account)
    assert await events(pool, account, "balance.depleted")
    # Transactional jobs get past the pause and spend the reserve, down to zero.
    otps = [await begin(pool, account, 1, priority="transactional") for _ in range(5)]
    assert [b.outcome for _, b in otps] == ["send"] * 4 + ["held"]
    assert (await CreditStore(pool).balance(account)).available == 0
    # Credits arrive: the held transactional job goes; bulk waits until it leaves the floor.
    await CreditStore(pool).grant(account, 5, "purchase", f"{account}-more")
    released = await release(pool, account)
    assert released[0] == otps[4][0]
    assert bulk[3][0] not in released
    await CreditStore(pool).grant(account, 10, "purchase", f"{account}-more2")
    assert await release(pool, account) == [bulk[3][0]]
    assert await run_audit(pool) == []


async def test_raising_the_cap_lifts_the_hold_at_once(pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 100, GuardSettings(daily_spend_cap=2))
    jobs = [await begin(pool, account, 1) for _ in range(4)]
    assert [b.outcome for _, b in jobs] == ["send", "send", "held", "held"]
    assert await set_guards(pool, account, GuardSettings(daily_spend_cap=3))
    assert (await load_guards(pool, account)).capped_until is None
    # One more fits under 3; the second is capped again.
    assert await release(pool, account) == [jobs[2][0], "still_paused"]
    assert [e["routing_key"] for e in await events(pool, account)] == [
        "account.capped", "account.uncapped", "account.capped"]


async def test_transactional_overdraft_goes_below_zero_and_a_failed_send_owes_nothing(
        pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 3, GuardSettings(transactional_overdraft=5))
    store = CreditStore(pool)
    bulk_id, bulk = await begin(pool, account, 4)
    assert bulk.outcome == "held"  # bulk never goes below zero
    otps = [await begin(pool, account, 2, priority="transactional") for _ in range(5)]
    assert [b.outcome for b in (o for _, o in otps)] == ["send"] * 4 + ["held"]
    balance = await store.balance(account)
    assert (balance.available, balance.debt, balance.reserved) == (-5, 5, 8)
    assert await run_audit(pool) == []
    jobs = JobStore(pool)
    # The last one fails: its debt part (2) is owed no more.
    await jobs.not_sent(otps[3][0], "provider_refused")
    assert (await store.balance(account)).available == -3
    # One costs less than reserved (1 of 2): the unused credit comes off the debt first.
    await store.capture(otps[2][0], 1)
    await store.capture(otps[0][0], 2)
    await store.capture(otps[1][0], 2)
    balance = await store.balance(account)
    assert (balance.available, balance.debt, balance.reserved) == (-2, 2, 0)
    assert await run_audit(pool) == []
    # Credits arrive: the debt is repaid first, then the held jobs go in order.
    await store.grant(account, 10, "purchase", f"{account}-top-up")
    assert await release(pool, account) == [bulk_id, otps[4][0]]
    assert (await store.balance(account)).available == 2
    assert await run_audit(pool) == []
