"""Issue 17, the recharge storm: an account that spends fast, a card that declines and then
charges slowly, the real dispatcher and the reference billing service end to end.

However the balance moves, billing never makes more than the hourly limit of charges in any
hour of its (injected) clock, never charges past the monthly cap, and every charge is granted
exactly once; both audits are clean. An hour passes in a call, not a sleep.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from billing_client.reference.audit import run_checks
from billing_client.reference.clock import next_month_start
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from tests.integration.billing_stack import BillingStack, billing_stack_fixture  # noqa: F401
from tests.integration.dispatcher_fixture import wait_for
from tests.integration.test_billing_flow import uid

JOBS = 160
CAP = 100  # credits a month: at most 5 auto-recharges of 20


async def invoices(stack: BillingStack, account: str) -> list[dict[str, object]]:
    rows = await stack.d.pool.fetch(
        "SELECT credits, payment_reference, created_at, hourly_limit, monthly_cap "
        "FROM billing_ref.invoices WHERE account = $1 ORDER BY id", account)
    return [dict(r) for r in rows]


async def deferred_by_the_hourly_limit(stack: BillingStack, account: str) -> bool:
    return bool(await stack.d.pool.fetchval(
        "SELECT count(*) FROM billing_ref.topups WHERE account = $1 AND status = 'in_flight' "
        "AND last_reason = 'hourly_limit'", account))


async def test_recharge_storm_stays_within_the_hourly_limit_and_the_monthly_cap(
        stack: BillingStack) -> None:
    if next_month_start(stack.clock()) - stack.clock() < timedelta(hours=6):
        stack.clock.advance(-timedelta(hours=12))  # the two hours below stay in one month
    account = uid("storm")
    await create_account(stack.d.pool, account, auto_recharge=(True, 10, 20))
    # An adjustment, not a purchase: the cross-check wants an invoice for every purchase.
    await CreditStore(stack.d.pool).grant(account, 20, "adjustment", uid("seed"))
    await stack.billing.set_recharge_limits(account, monthly_cap=CAP)
    await stack.methods(account, "tok_ok", "tok_ok")
    stack.gateway.decline_next = 2  # primary and backup decline: 2 in a row, not 3
    stack.gateway.latency = 0.3  # then every charge is slow
    ids = [f"{account}-{i:03d}" for i in range(JOBS)]
    await asyncio.gather(*(stack.d.publish_sms(job_id, account, to="+14155550177")
                           for job_id in ids))

    # The first hour: three charges, then the next top-up waits for the window.
    async def hour_used() -> bool:
        return await deferred_by_the_hourly_limit(stack, account)
    await wait_for(hour_used, timeout=60)
    await asyncio.sleep(0.5)
    first_hour = await invoices(stack, account)
    assert len(first_hour) == 3
    assert len(stack.gateway.charges_for(account)) == 3
    assert [c.status for c in stack.gateway.calls_for(account)][:2] == ["declined", "declined"]
    statuses = await stack.statuses(account)
    assert "held" in statuses.values()  # the account needs credits, and still waits

    # An hour later the deferred top-up goes out, and charging goes on up to the cap.
    stack.clock.advance(timedelta(hours=1, minutes=1))
    stack.billing.wake()

    async def capped() -> bool:
        return bool(stack.seen("topup.capped", account))
    await wait_for(capped, timeout=60)
    stack.clock.advance(timedelta(hours=1, minutes=1))  # a new hour, but the same month
    stack.billing.wake()
    await asyncio.sleep(1.0)

    charged = await invoices(stack, account)
    assert sum(int(str(i["credits"])) for i in charged) <= CAP
    assert len(charged) == len(stack.gateway.charges_for(account))
    times = sorted(i["created_at"] for i in charged)  # type: ignore[type-var]
    for n, at in enumerate(times):
        in_hour = [t for t in times[:n + 1] if t > at - timedelta(hours=1)]  # type: ignore
        assert len(in_hour) <= 3
    [notice] = stack.seen("topup.capped", account)
    assert notice["cap"] == CAP
    warnings = stack.seen("topup.cap_warning", account)
    assert sorted(w["percent"] for w in warnings) == [80, 90]

    # No duplicate grants: one ledger grant per charge, each payment reference once.
    async def all_granted() -> bool:
        return len(await stack.grant_lines(account)) == 1 + len(charged)
    await wait_for(all_granted)
    grants = [g for g in await stack.grant_lines(account) if g["kind"] == "grant_auto_recharge"]
    references = {f"grant:{i['payment_reference']}" for i in charged}
    assert sorted(g["reference"] for g in grants) == sorted(references)
    tapped = [g["payment_reference"] for g in stack.seen("credits.granted", account)]
    assert len(set(tapped)) == len(charged)

    # Both audits are clean: the dispatcher's (cross-checked with billing) and billing's own.
    code, out = await stack.cli("audit", "--billing-dsn", stack.d.settings.database_url)
    assert code == 0, out
    assert await run_checks(stack.d.pool) == []
    stack.check_contract()
    lows = stack.seen("balance.low", account) + stack.seen("balance.depleted", account)
    assert lows and all("forecast" in e for e in lows)


async def test_declines_pause_auto_recharge_on_both_sides_until_the_owner_turns_it_on(
        stack: BillingStack) -> None:
    account = uid("paused")
    await create_account(stack.d.pool, account, auto_recharge=(True, 10, 20))
    await stack.methods(account, "tok_decline", "tok_decline")
    await CreditStore(stack.d.pool).grant(account, 5, "adjustment", uid("seed"))  # below 10

    async def turned_off_here() -> bool:
        return not await stack.d.pool.fetchval(
            "SELECT auto_recharge_enabled FROM accounts WHERE id = $1", account)
    await wait_for(turned_off_here, timeout=30)
    [disabled] = stack.seen("topup.disabled", account)
    assert disabled["declines"] == 3 and disabled["settings_changed_at"] is None
    assert len(stack.gateway.calls_for(account)) == 3 and not stack.gateway.charges_for(account)

    # The owner fixes the card and turns auto-recharge on in the dispatcher: still below the
    # threshold, so one balance.low at once, whose new changed_at lifts billing's pause.
    await stack.methods(account, "tok_ok")
    code, out = await stack.cli("accounts", "auto-recharge", account, "on", "--threshold", "10",
                                "--amount", "20")
    assert code == 0, out

    async def topped_up() -> bool:
        return await stack.available(account) == 25
    await wait_for(topped_up, timeout=30)
    assert len(stack.gateway.charges_for(account)) == 1
    lows = stack.seen("balance.low", account)
    assert lows[-1]["auto_recharge"]["changed_at"] is not None
    status = await stack.billing.recharge_status(account)
    assert status is not None and status["paused_at"] is None
    code, out = await stack.cli("audit", "--billing-dsn", stack.d.settings.database_url)
    assert code == 0, out
    assert await run_checks(stack.d.pool) == []
