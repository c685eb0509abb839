"""Pure pieces of the reference billing service: rules, backoff, fake gateway, settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing_client import AutoRecharge, BalanceDepleted, BalanceLow
from billing_client.reference import BillingSettings, FakeGateway, InvalidSettings
from billing_client.reference.decision import AccountState, backoff_seconds, decide
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
