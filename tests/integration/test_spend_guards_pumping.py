"""SMS pumping against the running dispatcher (RabbitMQ in, the Twilio sandbox out): jobs to a
country outside the allowlist and a sudden bulk burst far above the usual rate. Nothing outside
the allowlist is sent or charged; the burst stops at the velocity threshold exactly, and the
transactional traffic beside it still goes."""

from __future__ import annotations

from dispatcher.credits.audit import run_audit
from dispatcher.credits.guards import GuardSettings, load_guards, set_guards
from dispatcher.credits.ledger import CreditStore
from tests.integration.dispatcher_fixture import RunningDispatcher, wait_for
from tests.integration.guards_helpers import events, reserved_today, uid
from tests.integration.test_api_broadcasts import numbers_of

USUAL = 3  # credits per window, as if learned from the account's past
MULTIPLE = 4
THRESHOLD = USUAL * MULTIPLE
BURST = 40
PUMPED = 6
OTPS = 3


async def test_pumping_is_refused_and_the_burst_held_at_the_threshold(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    account = await d.funded_account(uid("acct"), 1000)
    assert await set_guards(d.pool, account, GuardSettings(
        allowed_countries=("US",), velocity_window_seconds=3600, velocity_multiple=MULTIPLE,
        velocity_min_credits=5))
    await d.pool.execute("UPDATE account_guards SET usual_per_window = $2, window_start = now()"
                         " WHERE account_id = $1", account, USUAL)
    premium = numbers_of("LV", PUMPED)
    us = numbers_of("US", BURST + OTPS)
    for i, to in enumerate(premium):
        await d.publish_sms(f"{account}-pump-{i}", account, to=to, priority="bulk")
    for i in range(BURST):
        await d.publish_sms(f"{account}-burst-{i:02d}", account, to=us[i], priority="bulk")

    async def counted(delivered: int) -> bool:
        statuses = [r["status"] for r in await d.pool.fetch(
            "SELECT status FROM jobs WHERE account_id = $1", account)]
        dead = await events(d.pool, account, "status.sms.dead_lettered")
        return (statuses.count("delivered") == delivered
                and statuses.count("held") == BURST - THRESHOLD and len(dead) == PUMPED)

    async def burst_held() -> bool:
        return await counted(THRESHOLD)
    await wait_for(burst_held, timeout=40)
    # One-time passwords while the bulk burst is held: they go.
    for i in range(OTPS):
        await d.publish_sms(f"{account}-otp-{i}", account, to=us[BURST + i])

    async def otps_sent() -> bool:
        return await counted(THRESHOLD + OTPS)
    await wait_for(otps_sent, timeout=40)

    dead = await events(d.pool, account, "status.sms.dead_lettered")
    assert {e["reason"] for e in dead} == {"country_not_allowed"}
    assert all(e["credits"] == 0 for e in dead)
    assert not any(d.sandbox.state.creates(to=to) for to in premium)
    assert not await d.pool.fetchval(
        "SELECT count(*) FROM ledger WHERE account_id = $1 AND job_id LIKE '%-pump-%'", account)
    assert await reserved_today(d.pool, account) == THRESHOLD + OTPS
    held = await d.pool.fetch("SELECT job_id, reason FROM jobs WHERE account_id = $1"
                              " AND status = 'held'", account)
    assert {r["reason"] for r in held} == {"velocity"}
    assert all("-burst-" in r["job_id"] for r in held)
    assert [e["routing_key"] for e in await events(d.pool, account)] == ["account.velocity_held"]
    assert (await load_guards(d.pool, account)).velocity_held_since is not None
    balance = await CreditStore(d.pool).balance(account)
    assert balance.available + balance.reserved == 1000 - THRESHOLD - OTPS
    assert await run_audit(d.pool) == []
