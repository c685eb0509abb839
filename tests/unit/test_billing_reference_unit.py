"""Pure pieces of the reference billing service: rules, backoff, fake gateway, settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing_client import AutoRecharge, BalanceDepleted, BalanceLow
from billing_client.reference import BillingSettings, FakeGateway, InvalidSettings
from billing_client.reference.clock import month_of, month_start, next_month_start
from billing_client.reference.decision import (
    AccountState,
    Limits,
    backoff_seconds,
    cap_levels,
    check_limits,
    decide,
    gate_charge,
)
from billing_client.reference.queries import parse, q
from billing_client.reference.topups import payment_reference

T0 = datetime(2026, 1, 1, tzinfo=UTC)
IDLE = AccountState(in_flight=False)


def low(enabled: bool = True, amount: int = 1000, shortfall: int | None = None) -> BalanceLow:
    return BalanceLow(account="a1", available=100, threshold=400, episode=1, shortfall=shortfall,
                      auto_recharge=AutoRecharge(enabled=enabled, threshold=400, amount=amount))


def depleted(enabled: bool = False, insist: bool = True, available: int = 0,
             held: int = 10, at: datetime = T0) -> BalanceDepleted:
    return BalanceDepleted(account="a1", available=available, held_jobs=1, held_credits=held,
                           episode=1, topup_requested_even_if_disabled=insist, occurred_at=at,
                           auto_recharge=AutoRecharge(enabled=enabled, threshold=400,
                                                      amount=1000))


def test_enabled_low_starts_and_disabled_low_does_not() -> None:
    assert decide(low(), IDLE).starts_topup
    assert decide(low(enabled=False), IDLE).decision == "auto_recharge_disabled"
    assert decide(low(amount=0), IDLE).decision == "nothing_to_charge"


def test_low_at_zero_tops_up_with_the_saved_settings_even_if_disabled() -> None:
    below_zero = low(enabled=False, amount=20, shortfall=6).model_copy(
        update={"available": -1, "topup_requested_even_if_disabled": True})
    verdict = decide(below_zero, IDLE)
    assert (verdict.decision, verdict.amount) == ("start_topup", 20)


def test_depleted_tops_up_even_if_disabled_when_the_dispatcher_insists() -> None:
    assert decide(depleted(enabled=False, insist=True), IDLE).amount == 1000
    assert not decide(depleted(enabled=False, insist=False), IDLE).starts_topup


def test_one_charge_closes_a_larger_shortfall() -> None:
    assert decide(depleted(available=-200, held=5000), IDLE).amount == 5200
    assert decide(low(shortfall=3000), IDLE).amount == 3000
    assert decide(low(shortfall=10), IDLE).amount == 1000


def test_in_flight_and_episode_rules() -> None:
    assert decide(low(), AccountState(in_flight=True)).decision == "topup_in_flight"
    done = AccountState(False, "succeeded", T0)
    assert decide(low(), done).decision == "episode_topped_up"
    assert decide(depleted(at=T0 - timedelta(seconds=1)), done).decision == "episode_topped_up"
    assert decide(depleted(at=T0 + timedelta(seconds=1)), done).starts_topup
    unpublished = AccountState(False, "succeeded", None)
    assert not decide(depleted(at=T0), unpublished).starts_topup


def test_after_giving_up_only_new_payment_methods_restart_the_episode() -> None:
    gave_up = AccountState(False, "failed", T0, T0 - timedelta(hours=1))
    assert decide(low(), gave_up).decision == "episode_gave_up"
    fixed = AccountState(False, "failed", T0, T0 + timedelta(minutes=1))
    assert decide(low(), fixed).starts_topup


def test_backoff_is_exponential_and_capped() -> None:
    assert [backoff_seconds(n, 1.0, 5.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]


async def test_fake_gateway_is_idempotent_by_key() -> None:
    gw = FakeGateway()
    first = await gw.charge("a1", "tok_ok", 100, "k1")
    assert first.succeeded and await gw.charge("a1", "tok_ok", 100, "k1") == first
    assert len(gw.charges) == 1 and len(gw.calls) == 2
    reused = await gw.charge("a1", "tok_ok", 999, "k1")
    assert reused.status == "error" and len(gw.charges) == 1
    assert (await gw.charge("a1", "tok_decline", 100, "k2")).status == "declined"
    assert (await gw.charge("a1", "tok_insufficient_funds", 1, "k3")).status == (
        "insufficient_funds")


async def test_fake_gateway_timeout_charges_behind_the_timeout_once() -> None:
    gw = FakeGateway(timeout_delay=0.01)
    assert (await gw.charge("a1", "tok_timeout", 100, "k")).status == "timeout"
    assert (await gw.charge("a1", "tok_timeout", 100, "k")).succeeded
    assert len(gw.charges) == 1


def test_settings_from_env_and_secrets_not_in_repr() -> None:
    s = BillingSettings.from_env({"BILLING_DATABASE_URL": "postgresql://u:pw@db/x",
                                  "BILLING_MAX_ATTEMPTS": "4", "BILLING_DEFAULT_PRIMARY": "tok_x",
                                  "BILLING_BACKOFF_BASE_SECONDS": "1.5",
                                  "BILLING_AMQP_PREFIX": "p"})
    assert (s.max_attempts, s.backoff_base_seconds, s.default_primary) == (4, 1.5, "tok_x")
    assert (s.exchange, s.queue, s.dead_queue) == ("p.billing", "p.billing-service",
                                                   "p.billing-service.dead")
    assert "pw@" not in repr(s) and "tok_x" not in repr(s)
    with pytest.raises(InvalidSettings):
        BillingSettings.from_env({"BILLING_MAX_ATTEMPTS": "0"})
    with pytest.raises(InvalidSettings):
        BillingSettings.from_env({"BILLING_MAX_ATTEMPTS": "many"})


def test_payment_reference_is_contract_safe_and_queries_load() -> None:
    assert payment_reference("ch_1 2") == "auto-recharge:ch_1-2"
    assert "FOR UPDATE SKIP LOCKED" in q("claim_due_topup")
    with pytest.raises(ValueError, match="duplicate"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2")


# --- recharge safety rules (issue 17) ---------------------------------------------------------

def limits(**changes: object) -> Limits:
    base: dict[str, object] = dict(
        paused=False, hourly_limit=3, decline_limit=3, monthly_cap=None, cap_unit="credits",
        capped=False, charges_last_hour=0, oldest_in_hour=None, month_used=0)
    return Limits(**{**base, **changes})  # type: ignore[arg-type]


def test_gate_paused_capped_and_the_charge_that_would_pass_the_cap() -> None:
    assert gate_charge(limits(), 1000, T0).decision == "charge"
    assert gate_charge(limits(paused=True), 1000, T0).decision == "auto_recharge_paused"
    assert gate_charge(limits(capped=True), 1, T0).decision == "monthly_cap"
    assert gate_charge(limits(monthly_cap=5000, month_used=4000), 1000, T0).decision == "charge"
    assert gate_charge(limits(monthly_cap=5000, month_used=4001), 1000, T0).decision == (
        "monthly_cap")


def test_gate_hourly_limit_waits_until_the_oldest_charge_is_an_hour_old() -> None:
    oldest = T0 - timedelta(minutes=40)
    gate = gate_charge(limits(charges_last_hour=3, oldest_in_hour=oldest), 10, T0)
    assert (gate.decision, gate.retry_at) == ("hourly_limit", oldest + timedelta(hours=1))
    assert gate_charge(limits(charges_last_hour=2, oldest_in_hour=oldest), 10, T0).decision == (
        "charge")


def test_cap_levels() -> None:
    assert cap_levels(100, None) == []
    assert cap_levels(79, 100) == [] and cap_levels(80, 100) == [80]
    assert cap_levels(95, 100) == [80, 90] and cap_levels(100, 100) == [80, 90, 100]


def test_paused_or_capped_accounts_start_no_topup() -> None:
    assert decide(low(), AccountState(False, paused=True)).decision == "auto_recharge_paused"
    assert decide(depleted(), AccountState(False, capped=True)).decision == "monthly_cap"


def test_limits_are_checked_naming_the_field() -> None:
    check_limits(hourly_limit=1, decline_limit=1, monthly_cap=1, cap_unit="money")
    for bad, field in (({"hourly_limit": 0}, "hourly_limit"), ({"monthly_cap": -1}, "monthly_cap"),
                       ({"cap_unit": "eur"}, "cap_unit"), ({"decline_limit": 0}, "decline_limit")):
        with pytest.raises(InvalidSettings, match=field):
            check_limits(**bad)  # type: ignore[arg-type]


def test_calendar_months_in_utc() -> None:
    at = datetime(2026, 12, 31, 23, 30, tzinfo=UTC)
    assert (month_of(at), month_start(at).day, next_month_start(at)) == (
        "2026-12", 1, datetime(2027, 1, 1, tzinfo=UTC))
    with pytest.raises(InvalidSettings):
        BillingSettings(hourly_charge_limit=0)


def test_only_an_owner_change_after_the_pause_lifts_it() -> None:
    paused = AccountState(False, paused=True, paused_settings_at=T0)

    def enabled_low(changed: datetime | None, enabled: bool = True) -> BalanceLow:
        return low().model_copy(update={"auto_recharge": AutoRecharge(
            enabled=enabled, threshold=400, amount=1000, changed_at=changed)})
    assert decide(enabled_low(None), paused).decision == "auto_recharge_paused"
    assert decide(enabled_low(T0), paused).decision == "auto_recharge_paused"
    lifted = decide(enabled_low(T0 + timedelta(seconds=1)), paused)
    assert lifted.starts_topup and lifted.resume
    assert not decide(enabled_low(T0 + timedelta(1), enabled=False), paused).starts_topup
    never = AccountState(False, paused=True)
    assert decide(enabled_low(T0), never).resume
