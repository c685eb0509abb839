"""Spend guards on broadcasts: the pre-flight's figures, skipped recipients, held batches."""

from __future__ import annotations

import json

import asyncpg

from dispatcher.broadcasts.preflight import Recipients
from dispatcher.broadcasts.runner import BroadcastRunner, Broadcasts
from dispatcher.credits.audit import run_audit
from dispatcher.credits.guards import GuardSettings, set_guards
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.rates import RateCache
from dispatcher.jobs.contract import BroadcastJob
from dispatcher.jobs.outcomes import Done, Outcome
from dispatcher.pricing.templates import Template
from dispatcher.queries import q
from tests.integration.guards_helpers import events, guarded_account, reserved_today, uid
from tests.integration.test_api_broadcasts import numbers_of
from tests.integration.test_broadcast_counts import counts


def a_job(account: str, numbers: list[str]) -> BroadcastJob:
    return BroadcastJob.model_validate({
        "schema_version": 1, "id": uid("b"), "kind": "broadcast", "account": account,
        "from": "+14155550199", "body": "Sale today",
        "recipients": [{"to": n} for n in numbers]})


async def run_out(pool: asyncpg.Pool, broadcast_id: str) -> list[str]:
    """Run the broadcast's batches until none is pending; the job ids sent."""
    sent: list[str] = []

    async def send(payload: bytes, attempt: int, wanted: object) -> Outcome:
        sent.append(json.loads(payload)["id"])
        return Done("sent")

    runner = BroadcastRunner(pool, RateCache(pool), send, batch=4, window=8)
    row = await pool.fetchrow("SELECT * FROM broadcasts WHERE id = $1", broadcast_id)
    while await runner.step(row):
        await runner.drain(5.0)
    await runner.drain(5.0)
    return sent


async def test_preflight_counts_guard_skips_and_what_fits_today(pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 1000, GuardSettings(
        daily_spend_cap=5, allowed_countries=("US",)))
    numbers = numbers_of("US", 8) + numbers_of("GB", 3)
    result = await Broadcasts(pool, RateCache(pool)).preflight(
        account, Template("Sale today", False), Recipients(numbers, [{}] * len(numbers)))
    body = result.as_json()
    assert body["skipped"]["country_not_allowed"] == 3  # type: ignore[index]
    assert result.billable == 8 and result.credits == 8
    assert body["fits_today"] == {"remaining_today": 5, "recipients": 5, "credits": 5,
                                  "held_until_tomorrow": 3}


async def test_preflight_skips_messages_above_the_price_limit(pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 1000, GuardSettings(max_credits_per_message=1))
    numbers = numbers_of("US", 3)
    long_text = "x" * 200  # two SMS parts: 2 credits
    result = await Broadcasts(pool, RateCache(pool)).preflight(
        account, Template("{t}", False),
        Recipients(numbers, [{"t": "short"}, {"t": long_text}, {"t": "short"}]))
    assert result.skip_reasons == {1: "price_above_limit"}
    assert result.as_json()["fits_today"] is None


async def test_broadcast_skips_other_countries_and_holds_at_the_daily_cap(
        pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 1000, GuardSettings(
        daily_spend_cap=5, allowed_countries=("US",)))
    numbers = numbers_of("US", 8) + numbers_of("GB", 3)
    broadcast_id = uid("bc")
    result, stored = await Broadcasts(pool, RateCache(pool)).submit(
        broadcast_id, a_job(account, numbers), refuse_if_short=False)
    assert stored and result.skipped["country_not_allowed"] == 3
    sent = await run_out(pool, broadcast_id)
    assert len(sent) == 5
    assert await reserved_today(pool, account) == 5
    found = await counts(pool, broadcast_id)
    assert (found["pending"], found["sending"], found["held"]) == (0, 5, 3)
    reasons = await pool.fetch("SELECT DISTINCT reason FROM jobs WHERE broadcast_id = $1"
                               " AND status = 'held'", broadcast_id)
    assert [r["reason"] for r in reasons] == ["daily_cap"]
    assert [e["routing_key"] for e in await events(pool, account)] == ["account.capped"]
    assert await run_audit(pool) == []


async def test_allowlist_changed_after_submission_skips_in_the_reservation(
        pool: asyncpg.Pool) -> None:
    account = await guarded_account(pool, 1000, GuardSettings())
    numbers = numbers_of("US", 3) + numbers_of("GB", 2)
    broadcast_id = uid("bc")
    _, stored = await Broadcasts(pool, RateCache(pool)).submit(
        broadcast_id, a_job(account, numbers), refuse_if_short=False)
    assert stored
    # The owner narrows the allowlist while the broadcast waits: the reservation enforces it.
    assert await set_guards(pool, account, GuardSettings(allowed_countries=("US",)))
    sent = await run_out(pool, broadcast_id)
    assert len(sent) == 3
    assert (await CreditStore(pool).balance(account)).reserved == 3
    skipped = await pool.fetch(
        "SELECT skip_reason FROM broadcast_recipients WHERE broadcast_id = $1"
        " AND status = 'skipped'", broadcast_id)
    assert [r["skip_reason"] for r in skipped] == ["country_not_allowed"] * 2
    assert (await pool.fetchrow(q("broadcast_get"), broadcast_id))["skipped"] == 2
    skipped_events = await events(pool, account, "status.broadcast.skipped")
    assert [e["reason"] for e in skipped_events] == ["country_not_allowed"] * 2
    assert all(e["credits"] == 0 for e in skipped_events)
    found = await counts(pool, broadcast_id)
    assert (found["pending"], found["sending"], found["held"]) == (0, 3, 0)
    assert await run_audit(pool) == []
