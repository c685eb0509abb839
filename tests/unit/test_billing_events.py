"""Billing events v1: round trips, routing keys, and what decoders refuse or tolerate."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from billing_client import (
    EVENT_TYPES,
    AutoRecharge,
    BalanceDepleted,
    BalanceForecast,
    BalanceLow,
    BillingEvent,
    CreditsGranted,
    DeclinedCharge,
    InvalidEvent,
    TopupCapped,
    TopupCapWarning,
    TopupDisabled,
    TopupFailed,
    decode_event,
    encode_event,
)

SETTINGS = AutoRecharge(enabled=True, threshold=400, amount=1000)
EVENTS: list[BillingEvent] = [
    BalanceLow(account="acme", available=380, threshold=400, auto_recharge=SETTINGS, episode=3),
    BalanceLow(account="acme", available=-5, threshold=400, auto_recharge=SETTINGS, episode=3,
               shortfall=120),
    BalanceDepleted(account="acme", available=0, held_jobs=12, held_credits=96, episode=3,
                    auto_recharge=AutoRecharge(enabled=False, threshold=400, amount=1000),
                    topup_requested_even_if_disabled=True),
    CreditsGranted(account="acme", amount=1000, kind="auto_recharge",
                   payment_reference="pay_3Nf8x2Lk", payment_method="backup", episode=3,
                   in_reply_to=uuid.uuid4()),
    CreditsGranted(account="acme", amount=50, kind="adjustment", payment_reference="adj-17"),
    TopupFailed(account="acme", attempts=2, reason="declined",
                advice="Raise the auto-recharge amount so charges happen less often.",
                next_attempt_at=datetime.now(UTC) + timedelta(hours=1), amount=1000),
    TopupFailed(account="acme", attempts=5, reason="insufficient_funds"),
    BalanceLow(account="acme", available=600, threshold=1000, auto_recharge=SETTINGS, episode=4,
               forecast=BalanceForecast(spent=1200, seconds_to_zero=1800), held_jobs=2,
               held_credits=16),
    TopupCapWarning(account="acme", percent=90, month="2026-11", unit="credits", cap=10000,
                    used=9000),
    TopupCapped(account="acme", month="2026-11", unit="money", cap=10000, used=9500,
                refused_amount=1000, resets_at=datetime(2026, 12, 1, tzinfo=UTC)),
    TopupDisabled(account="acme", declines=3, decline_reasons=[
        DeclinedCharge(reason="declined", payment_method="primary", at=datetime.now(UTC))]),
]


def wire(event: BillingEvent, **changes: Any) -> bytes:
    """The event's JSON with fields changed; a value of ``...`` removes the field."""
    data = json.loads(encode_event(event))
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def refused(raw: bytes) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(raw)
    return caught.value


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_round_trip(event: BillingEvent) -> None:
    decoded = decode_event(encode_event(event))
    assert decoded == event
    assert type(decoded) is type(event)
    assert decoded.routing_key == event.type in EVENT_TYPES


def test_defaults_make_unique_ids_and_aware_times() -> None:
    first, second = (BalanceLow(account="a", available=1, threshold=2, auto_recharge=SETTINGS,
                                episode=1) for _ in range(2))
    assert first.event_id != second.event_id
    assert first.occurred_at.tzinfo is not None
    assert first.schema_version == 1


def test_unknown_type_is_refused() -> None:
    error = refused(wire(EVENTS[0], type="balance.exploded"))
    assert error.reason == "unknown_type"
    assert refused(wire(EVENTS[0], type=...)).reason == "unknown_type"


def test_other_versions_are_refused() -> None:
    assert refused(wire(EVENTS[0], schema_version=2)).reason == "unsupported_version"
    assert refused(wire(EVENTS[0], schema_version=2, type="new.kind")).reason == (
        "unsupported_version")
    assert refused(wire(EVENTS[0], schema_version=True)).reason == "unsupported_version"


@pytest.mark.parametrize("changes", [
    {"event_id": ...}, {"occurred_at": ...}, {"schema_version": ...},
    {"event_id": "not-a-uuid"}, {"occurred_at": "2026-11-22T09:30:00"},
    {"account": "has space"}, {"episode": 0}, {"available": "380"},
    {"auto_recharge": {"enabled": True, "threshold": 400}},
])
def test_invalid_fields_are_refused(changes: dict[str, Any]) -> None:
    assert refused(wire(EVENTS[0], **changes)).reason == "invalid_field"


@pytest.mark.parametrize("changes", [
    {"amount": 0}, {"kind": "gift"}, {"payment_reference": ""},
    {"payment_reference": "ref with spaces"}, {"payment_method": "Card!"},
])
def test_invalid_grants_are_refused(changes: dict[str, Any]) -> None:
    assert refused(wire(EVENTS[3], **changes)).reason == "invalid_field"


def test_not_json_and_too_large() -> None:
    assert refused(b"{nope").reason == "not_json"
    assert refused(b"[]").reason == "invalid_field"
    assert refused(b" " * (64 * 1024 + 1)).reason == "too_large"


def test_balance_low_from_an_older_dispatcher_does_not_insist_on_a_top_up() -> None:
    event = decode_event(wire(EVENTS[0], topup_requested_even_if_disabled=...))
    assert isinstance(event, BalanceLow) and not event.topup_requested_even_if_disabled
    insisting = decode_event(wire(EVENTS[1], topup_requested_even_if_disabled=True))
    assert isinstance(insisting, BalanceLow) and insisting.topup_requested_even_if_disabled


def test_new_optional_fields_are_ignored() -> None:
    """Within version 1 producers may add optional fields; older consumers must keep working."""
    decoded = decode_event(wire(EVENTS[3], currency="EUR", invoice={"id": "in_1"}))
    assert decoded == EVENTS[3]


def test_open_codes_accept_values_not_known_yet() -> None:
    decoded = decode_event(wire(EVENTS[5], reason="fraud_suspected", payment_method="wallet"))
    assert isinstance(decoded, TopupFailed)
    assert (decoded.reason, decoded.payment_method) == ("fraud_suspected", "wallet")


def test_decoded_events_are_immutable() -> None:
    event = decode_event(encode_event(EVENTS[3]))
    assert isinstance(event, CreditsGranted)
    with pytest.raises(ValueError, match="frozen"):
        event.amount = 5
