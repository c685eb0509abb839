"""Validity in the job contract: expires_at or validity_seconds, made absolute once, and the
ValidityPeriod Twilio is given."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from dispatcher.dispatch.handler import validity_period
from dispatcher.jobs.contract import (
    InvalidJob,
    decode_stored_job,
    encode_job,
    job_fingerprint,
    parse_job,
    with_expiry,
)

RECEIVED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def sms(**extra: Any) -> bytes:
    return json.dumps({"schema_version": 1, "id": "otp-1", "kind": "sms", "account": "acme",
                       "to": "+14155552671", "from": "+14155550199", "body": "123456",
                       **extra}).encode()


def test_validity_counts_from_created_at_else_from_receipt() -> None:
    stamped = with_expiry(parse_job(sms(validity_seconds=300,
                                        created_at="2026-12-01T13:00:00+01:00")), RECEIVED)
    assert stamped.expires_at == datetime(2026, 12, 1, 12, 5, tzinfo=UTC)
    assert stamped.expires_at.utcoffset() == timedelta(0)
    unstamped = with_expiry(parse_job(sms(validity_seconds=60)), RECEIVED)
    assert unstamped.expires_at == RECEIVED + timedelta(seconds=60)


def test_an_absolute_expiry_is_kept_in_utc_and_none_means_never() -> None:
    job = with_expiry(parse_job(sms(expires_at="2026-12-01T14:00:00+02:00")), RECEIVED)
    assert job.expires_at == datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert job.expires_at.tzinfo == UTC
    plain = parse_job(sms())
    assert with_expiry(plain, RECEIVED) is plain and plain.expires_at is None


@pytest.mark.parametrize("extra", [
    {"validity_seconds": 60, "expires_at": "2026-12-01T14:00:00Z"},
    {"validity_seconds": 0}, {"validity_seconds": 30 * 24 * 3600 + 1},
    {"validity_seconds": 1.5}, {"expires_at": "2026-12-01T14:00:00"},  # no offset
])
def test_invalid_validity_is_refused(extra: dict[str, Any]) -> None:
    with pytest.raises(InvalidJob) as refused:
        parse_job(sms(**extra))
    assert refused.value.reason == "invalid_field"


def test_the_stored_form_has_both_and_a_republish_keeps_its_fingerprint() -> None:
    first = with_expiry(parse_job(sms(validity_seconds=300, created_at="2026-12-01T12:00:00Z")),
                        RECEIVED)
    again = with_expiry(parse_job(sms(validity_seconds=300, created_at="2026-12-01T12:00:09Z")),
                        RECEIVED)
    stored = decode_stored_job(encode_job(first))
    assert (stored.expires_at, stored.validity_seconds) == (first.expires_at, 300)
    assert job_fingerprint(first) == job_fingerprint(again)
    assert job_fingerprint(first) != job_fingerprint(parse_job(sms(validity_seconds=301)))


@pytest.mark.parametrize(("left", "period"), [
    (None, None), (-3.0, None), (0.99, None), (1.0, 1), (599.7, 599), (36000.9, 36000),
    (36001.0, None)])
def test_validity_period_is_whole_seconds_within_twilio_range(left: float | None,
                                                              period: int | None) -> None:
    assert validity_period(left) == period


def test_offsets_other_than_utc_are_accepted() -> None:
    tz = timezone(timedelta(hours=-5))
    job = parse_job(sms(expires_at=datetime(2026, 12, 1, 7, 0, tzinfo=tz).isoformat()))
    assert with_expiry(job, RECEIVED).expires_at == datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
