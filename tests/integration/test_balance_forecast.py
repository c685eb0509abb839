"""Issue 17, dispatcher side of the safe auto-recharge (migration 0024): balance events carry a
time-to-zero forecast and the held jobs; settings that would charge in a loop are refused on
every path; enabling auto-recharge while already low asks for one top-up at once."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any

import asyncpg
import pytest

from billing_client import decode_event
from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.errors import InvalidAutoRecharge
from dispatcher.queries import q
from dispatcher.settings import Settings


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def billing_events(pool: asyncpg.Pool, account: str) -> list[dict[str, Any]]:
    """The account's balance events in the outbox, oldest first; each follows the contract."""
    rows = await pool.fetch("SELECT body FROM outbox WHERE exchange = 'billing' "
                            "AND body->>'account' = $1 ORDER BY id", account)
    bodies = [json.loads(r["body"]) for r in rows]
    for body in bodies:
        assert decode_event(json.dumps(body).encode()).type == body["type"]
    return bodies


async def test_balance_low_forecasts_time_to_zero_from_the_last_hours_spend(
        pool: asyncpg.Pool) -> None:
    account = uid("fc")
    await create_account(pool, account, auto_recharge=(True, 100, 500))
    store = CreditStore(pool)
    await store.grant(account, 300, "purchase", uid("seed"))
    await store.reserve(uid("job"), account, 40)  # 260
    given_back = uid("job")
    await store.reserve(given_back, account, 30)
    await store.release(given_back)  # a failed send gives its credits back: not spent
    for _ in range(4):
        await store.reserve(uid("job"), account, 40)  # 220, 180, 140, 100: not below yet
    await store.reserve(uid("job"), account, 40)  # 60: below 100
    [low] = await billing_events(pool, account)
    assert (low["type"], low["available"]) == ("balance.low", 60)
    # 240 credits net in the hour, the crossing reservation included (the forecast is made at
    # commit): 60 credits last 60 * 3600 / 240 = 900 s at that rate.
    assert low["forecast"] == {"window_seconds": 3600, "spent": 240, "seconds_to_zero": 900}
    assert (low["held_jobs"], low["held_credits"]) == (0, 0)
    assert await run_audit(pool) == []


async def test_at_zero_the_forecast_says_zero_and_held_jobs_are_counted(
        pool: asyncpg.Pool) -> None:
    account = uid("zero")
    await create_account(pool, account)  # auto-recharge off, top-up at zero on
    store = CreditStore(pool)
    await store.grant(account, 10, "purchase", uid("seed"))
    await store.reserve(uid("job"), account, 10)
    [low] = await billing_events(pool, account)
    assert low["type"] == "balance.low" and low["topup_requested_even_if_disabled"]
    assert low["forecast"] == {"window_seconds": 3600, "spent": 10, "seconds_to_zero": 0}

    # A job that cannot be paid is held and the account paused: balance.depleted.
    outcome = await pool.fetchval(
        "SELECT outcome FROM begin_job($1, $2, 'sms', 'transactional', '{}'::jsonb, 5, 'US', "
        "1, 5, NULL)", uid("held"), account)
    assert outcome == "held"
    depleted = (await billing_events(pool, account))[-1]
    assert depleted["type"] == "balance.depleted"
    assert (depleted["held_jobs"], depleted["held_credits"]) == (1, 5)
    assert depleted["forecast"]["seconds_to_zero"] == 0

    # Turning auto-recharge on while below the threshold, in the open episode: one new
    # balance.low (a new episode, so billing charges once), with the held jobs.
    await pool.execute(q("set_auto_recharge"), account, True, 50, 200, None)
    events = await billing_events(pool, account)
    assert [e["type"] for e in events] == ["balance.low", "balance.depleted", "balance.low"]
    enabled = events[-1]
    assert (enabled["episode"], enabled["auto_recharge"]["enabled"]) == (2, True)
    assert (enabled["held_jobs"], enabled["held_credits"], enabled["shortfall"]) == (1, 5, 50)
    # Changing the settings again while on does not ask again.
    await pool.execute(q("set_auto_recharge"), account, True, 60, 200, None)
    assert len(await billing_events(pool, account)) == 3


async def test_enabling_above_the_threshold_asks_for_nothing(pool: asyncpg.Pool) -> None:
    account = uid("above")
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 500, "purchase", uid("seed"))
    await pool.execute(q("set_auto_recharge"), account, True, 100, 400, None)
    assert await billing_events(pool, account) == []


@pytest.mark.parametrize(("threshold", "amount"), [(500, 100), (500, 500)])
async def test_settings_that_would_charge_in_a_loop_are_refused_everywhere(
        pool: asyncpg.Pool, settings: Settings, threshold: int, amount: int) -> None:
    account = uid("loop")
    with pytest.raises(InvalidAutoRecharge, match=r"amount .* must be greater than threshold"):
        await create_account(pool, account, auto_recharge=(True, threshold, amount))
    await create_account(pool, account, auto_recharge=(False, threshold, amount))  # off: fine
    with pytest.raises(asyncpg.CheckViolationError,
                       match=r"auto_recharge_amount .* auto_recharge_threshold"):
        await pool.execute(q("set_auto_recharge"), account, True, threshold, amount, None)
    env = {**os.environ, "DISPATCHER_DATABASE_URL": settings.database_url,
           "DISPATCHER_LOG_FORMAT": "console"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher", "accounts", "auto-recharge", account, "on",
        "--threshold", str(threshold), "--amount", str(amount), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "invalid_auto_recharge" in err.decode() and "threshold" in err.decode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher", "accounts", "auto-recharge", account, "on",
        "--threshold", str(threshold), "--amount", str(threshold + 1), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert await pool.fetchval("SELECT auto_recharge_enabled FROM accounts WHERE id = $1",
                               account)
