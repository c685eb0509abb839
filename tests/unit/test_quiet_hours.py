"""Quiet hours in the recipient's local time: midnight crossing, DST days, several zones."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from dispatcher.jobs.contract import CancelJob, SmsJob, parse_job, schedule_too_far
from dispatcher.pricing.quiet_hours import QuietHours, parse_clock, zones_for

NIGHT = QuietHours(time(21, 0), time(8, 0))
NEW_YORK = "+12125550100"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_window_contains_crossing_midnight_and_same_day() -> None:
    assert NIGHT.contains(time(23, 0)) and NIGHT.contains(time(0, 30))
    assert NIGHT.contains(time(21, 0)) and not NIGHT.contains(time(8, 0))
    assert not NIGHT.contains(time(12, 0))
    lunch = QuietHours(time(12, 0), time(14, 0))
    assert lunch.contains(time(13, 59)) and not lunch.contains(time(14, 0))
    with pytest.raises(ValueError, match="differ"):
        QuietHours(time(8, 0), time(8, 0))


@pytest.mark.parametrize(("at", "until"), [
    ("2026-07-01T02:00:00", "2026-07-01T12:00:00"),  # 22:00 EDT -> 08:00 EDT the next day
    ("2026-07-01T07:00:00", "2026-07-01T12:00:00"),  # 03:00 EDT, after midnight
    ("2026-07-01T16:00:00", None),  # noon: not quiet
    ("2026-07-01T12:00:00", None),  # 08:00 sharp: the window has ended
    # DST starts 2026-03-08 02:00 EST: the night is an hour shorter, 23:00 EST -> 08:00 EDT.
    ("2026-03-08T04:00:00", "2026-03-08T12:00:00"),
    # DST ends 2026-11-01 02:00 EDT: an hour longer, 23:00 EDT -> 08:00 EST.
    ("2026-11-01T03:00:00", "2026-11-01T13:00:00"),
])
def test_quiet_until_in_new_york(at: str, until: str | None) -> None:
    result = NIGHT.quiet_until(zones_for(NEW_YORK), utc(at))
    assert result == (utc(until) if until else None)


def test_a_window_ending_in_the_spring_forward_gap_ends_after_the_gap() -> None:
    window = QuietHours(time(22, 0), time(2, 30))  # 02:30 does not exist on 2026-03-08
    until = window.quiet_until(zones_for(NEW_YORK), utc("2026-03-08T06:00:00"))  # 01:00 EST
    assert until == utc("2026-03-08T07:30:00")  # 03:30 EDT, the first instant after it


def test_a_number_with_several_zones_waits_until_every_zone_is_outside() -> None:
    zones = zones_for("+61412345678")  # Australian mobile: Perth to Lord Howe, and islands
    assert len(zones) > 3
    at = utc("2026-01-15T10:30:00")  # 21:30 in Sydney, 18:30 in Perth
    until = NIGHT.quiet_until(zones, at)
    assert until is not None and until > at
    local = [until.astimezone(z).time() for z in zones]
    assert not any(NIGHT.contains(t) for t in local)
    just_before = until - timedelta(minutes=1)
    assert any(NIGHT.contains(just_before.astimezone(z).time()) for z in zones)


def test_unknown_zones_have_no_quiet_hours() -> None:
    assert NIGHT.quiet_until((), utc("2026-07-01T02:00:00")) is None


def test_parse_clock() -> None:
    assert parse_clock("21:05") == time(21, 5)
    for bad in ("9:00", "25:00", "21-00", "ab:cd"):
        with pytest.raises(ValueError):  # noqa: PT011
            parse_clock(bad)


def test_send_at_is_stored_in_utc_and_limited_to_35_days() -> None:
    job = parse_job(b'{"schema_version": 1, "id": "s1", "kind": "sms", "account": "a", '
                    b'"to": "+14155550100", "from": "+14155550199", "body": "hi", '
                    b'"send_at": "2026-07-01T10:00:00+02:00"}')
    assert isinstance(job, SmsJob)
    assert job.send_at == utc("2026-07-01T08:00:00")
    assert b'"send_at":"2026-07-01T08:00:00Z"' in job.model_dump_json(by_alias=True).encode()
    now = utc("2026-06-01T00:00:00")
    assert schedule_too_far(job.send_at, now) is None
    assert schedule_too_far(now + timedelta(days=36), now) is not None


def test_a_cancel_job_names_its_target() -> None:
    job = parse_job(b'{"schema_version": 1, "id": "c1", "kind": "cancel", "account": "a", '
                    b'"target": "s1"}')
    assert isinstance(job, CancelJob) and job.target == "s1" and job.priority == "transactional"
