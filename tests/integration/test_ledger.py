"""The ledger's operations against the real PostgreSQL: reserve, settle, grant, refund, audit."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import Plan, create_account
from dispatcher.errors import (
    AccountExists,
    AlreadySettled,
    InsufficientCredits,
    InvalidAmount,
    InvalidGrant,
    RefundTooLarge,
    ReservationConflict,
    UnknownAccount,
    UnknownReservation,
)


def new_id(prefix: str = "acct") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def funded(pool: asyncpg.Pool, *, subscription: int = 0, purchased: int = 0) -> str:
    account = new_id()
    await create_account(pool, account, plan=Plan(allocation=subscription))
    if purchased:
        await CreditStore(pool).grant(account, purchased, "purchase", new_id("pay"))
    return account


async def ledger_count(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM ledger"))


async def test_reserve_takes_subscription_first_then_oldest_purchase(pool: asyncpg.Pool) -> None:
    account = await funded(pool, subscription=5)
    store = CreditStore(pool)
    await store.grant(account, 4, "purchase", f"{account}-old")
    await store.grant(account, 4, "auto_recharge", f"{account}-new")

    await store.reserve("j1", account, 7)

    buckets = {r["reference"]: r["remaining"] for r in await pool.fetch(
        "SELECT reference, remaining FROM credit_buckets WHERE account_id = $1", account)}
    assert buckets == {f"{account}-old": 2, f"{account}-new": 4}
    balance = await store.balance(account)
    assert (balance.subscription, balance.purchased, balance.reserved) == (0, 6, 7)
    assert balance.available == 6 and balance.total == 13


async def test_same_job_id_reserves_once_and_returns_the_first(pool: asyncpg.Pool) -> None:
    account = await funded(pool, subscription=10)
    store = CreditStore(pool)
    first = await store.reserve("dup-1", account, 3)
    second = await store.reserve("dup-1", account, 5)
    assert first.new and not second.new
    assert second.amount == 3
    assert (await store.balance(account)).reserved == 3


async def test_insufficient_credits_writes_nothing(pool: asyncpg.Pool) -> None:
    account = await funded(pool, subscription=2)
    store = CreditStore(pool)
    before = await ledger_count(pool)
    with pytest.raises(InsufficientCredits) as info:
        await store.reserve(new_id("job"), account, 3)
    assert info.value.details["available"] == 2
    assert await ledger_count(pool) == before
    assert (await store.balance(account)).available == 2


async def test_job_id_of_another_account_conflicts(pool: asyncpg.Pool) -> None:
    a, b = await funded(pool, subscription=5), await funded(pool, subscription=5)
    store = CreditStore(pool)
    await store.reserve("shared-id", a, 1)
    with pytest.raises(ReservationConflict):
        await store.reserve("shared-id", b, 1)
    assert (await store.balance(b)).reserved == 0


async def test_reserve_many_goes_in_order_while_credits_last(pool: asyncpg.Pool) -> None:
    account = await funded(pool, subscription=3, purchased=3)
    store = CreditStore(pool)
    await store.reserve("pre", account, 1)
    result = await store.reserve_many(
        account, [("b1", 2), ("pre", 9), ("b2", 2), ("b3", 2), ("b4", 1)])
    assert result.reserved == ["b1", "b2"]
    assert result.existing == ["pre"]
    # b4 would fit, but order is kept: nothing after the first job that does not fit.
    assert result.insufficient == ["b3", "b4"]
    assert result.available == 1
    assert (await store.balance(account)).reserved == 5


async def test_capture_below_estimate_gives_the_rest_back(pool: asyncpg.Pool) -> None:
    account = await funded(pool, subscription=2, purchased=5)
    store = CreditStore(pool)
    await store.reserve("c1", account, 6)  # 2 subscription + 4 purchased
    settlement = await store.capture("c1", 3)
    assert settlement.status == "captured" and settlement.captured == 3
    balance = await store.balance(account)
    # Spent counts against the subscription share first: 2 sub + 1 purchased spent.
    assert (balance.subscription, balance.purchased, balance.reserved) == (0, 4, 0)


async def test_capture_above_estimate_charges_the_difference_into_debt(
        pool: asyncpg.Pool) -> None:
    account = await funded(pool, subscription=3)
    store = CreditStore(pool)
    await store.reserve("o1", account, 2)
    await store.capture("o1", 5)
    balance = await store.balance(account)
    assert (balance.subscription, balance.debt, balance.available) == (0, 2, -2)
    # The next grant repays the debt first, in its own single ledger row.
    await store.grant(account, 10, "purchase", new_id("pay"))
    balance = await store.balance(account)
    assert (balance.purchased, balance.debt, balance.available) == (8, 0, 8)
    assert await run_audit(pool) == []


async def test_settlement_is_idempotent_and_never_double(pool: asyncpg.Pool) -> None:
    account = await funded(pool, subscription=10)
    store = CreditStore(pool)
    await store.reserve("s1", account, 4)
    await store.capture("s1", 4)
    replay = await store.capture("s1", 4)
    assert replay.replayed
    with pytest.raises(AlreadySettled):
        await store.release("s1")
    with pytest.raises(AlreadySettled):
        await store.capture("s1", 3)
    assert (await store.balance(account)).available == 6
    rows = await pool.fetchval("SELECT count(*) FROM ledger WHERE job_id = 's1'")
    assert rows == 2


async def test_release_after_period_end_forfeits_the_subscription_share(
        pool: asyncpg.Pool) -> None:
    account = await funded(pool, subscription=5, purchased=2)
    store = CreditStore(pool)
    await store.reserve("r1", account, 6)  # 5 subscription + 1 purchased
    now = datetime.now(UTC)
    await store.start_period(account, 5, f"{account}:next", now, now + timedelta(days=30))
    await store.release("r1")
    balance = await store.balance(account)
    assert (balance.subscription, balance.purchased) == (5, 2)
    forfeited = await pool.fetchval(
        "SELECT forfeited FROM ledger WHERE reference = 'settle:r1'")
    assert forfeited == 5


async def test_renewal_resets_not_adds_and_ledgers_the_forfeit(pool: asyncpg.Pool) -> None:
    account = await funded(pool, subscription=10, purchased=3)
    store = CreditStore(pool)
    await store.reserve("n1", account, 4)
    await store.capture("n1", 4)
    now = datetime.now(UTC)
    assert await store.start_period(account, 10, f"{account}:p2", now, now + timedelta(days=30))
    assert not await store.start_period(account, 10, f"{account}:p2", now, now)
    balance = await store.balance(account)
    assert (balance.subscription, balance.purchased) == (10, 3)
    kinds = [r["kind"] for r in await pool.fetch(
        "SELECT kind FROM ledger WHERE account_id = $1 ORDER BY id", account)]
    assert kinds[-2:] == ["subscription_forfeit", "subscription_allocation"]


async def test_plan_upgrade_now_downgrade_at_renewal(pool: asyncpg.Pool) -> None:
    account = await funded(pool, subscription=10, purchased=5)
    store = CreditStore(pool)
    assert await store.change_plan(account, 25) == ("upgraded", 15)
    assert (await store.balance(account)).subscription == 25
    assert (await store.change_plan(account, 5))[0] == "downgrade_scheduled"
    assert (await store.balance(account)).subscription == 25
    row = await pool.fetchrow("SELECT allocation, next_allocation FROM accounts WHERE id = $1",
                              account)
    assert (row["allocation"], row["next_allocation"]) == (25, 5)
    assert (await store.balance(account)).purchased == 5


async def test_grant_is_idempotent_by_reference(pool: asyncpg.Pool) -> None:
    account = await funded(pool)
    store = CreditStore(pool)
    assert await store.grant(account, 7, "auto_recharge", f"{account}-pay")
    assert not await store.grant(account, 7, "auto_recharge", f"{account}-pay")
    with pytest.raises(InvalidGrant):
        await store.grant(account, 8, "auto_recharge", f"{account}-pay")
    assert (await store.balance(account)).purchased == 7


async def test_refund_only_unspent_purchased_credits(pool: asyncpg.Pool) -> None:
    account = await funded(pool)
    store = CreditStore(pool)
    await store.grant(account, 10, "purchase", f"{account}-p")
    await store.reserve("f1", account, 6)
    with pytest.raises(RefundTooLarge):
        await store.refund(account, f"{account}-p", 5, f"{account}-r1")
    assert await store.refund(account, f"{account}-p", 4, f"{account}-r1")
    assert not await store.refund(account, f"{account}-p", 4, f"{account}-r1")
    assert (await store.balance(account)).purchased == 0
    assert await run_audit(pool) == []


@pytest.mark.parametrize("amount", [0, -1, 1.5, True, "3"])
async def test_bad_amounts_are_rejected_before_the_database(pool: asyncpg.Pool,
                                                            amount: object) -> None:
    account = await funded(pool, subscription=5)
    before = await ledger_count(pool)
    with pytest.raises(InvalidAmount):
        await CreditStore(pool).reserve(new_id("job"), account, amount)  # type: ignore[arg-type]
    with pytest.raises(InvalidAmount):
        await CreditStore(pool).grant(account, amount, "purchase", new_id())  # type: ignore[arg-type]
    assert await ledger_count(pool) == before


async def test_unknown_account_and_reservation(pool: asyncpg.Pool) -> None:
    store = CreditStore(pool)
    before = await ledger_count(pool)
    with pytest.raises(UnknownAccount):
        await store.reserve("x1", "no-such-account", 1)
    with pytest.raises(UnknownAccount):
        await store.reserve_many("no-such-account", [("x2", 1)])
    with pytest.raises(UnknownAccount):
        await store.grant("no-such-account", 1, "purchase", "ref-x")
    with pytest.raises(UnknownReservation):
        await store.release("never-reserved")
    with pytest.raises(InvalidGrant):
        await store.grant("no-such-account", 1, "gift", "ref-y")
    assert await ledger_count(pool) == before


async def test_duplicate_account_is_refused(pool: asyncpg.Pool) -> None:
    account = await funded(pool)
    with pytest.raises(AccountExists):
        await create_account(pool, account)


async def test_ledger_rows_cannot_be_changed(pool: asyncpg.Pool) -> None:
    await funded(pool, subscription=1)
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await pool.execute("UPDATE ledger SET amount = amount + 1")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await pool.execute("DELETE FROM ledger")


async def test_audit_reports_a_tampered_balance(fresh_database_url: str) -> None:
    pool = await asyncpg.create_pool(fresh_database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        account = await funded(pool, subscription=5)
        assert await run_audit(pool) == []
        await pool.execute("UPDATE accounts SET sub_available = 6 WHERE id = $1", account)
        violations = await run_audit(pool)
        assert {v.check for v in violations} == {"audit_balances_vs_ledger"}
        assert violations[0].account_id == account
    finally:
        await pool.close()
