"""Small pure pieces: settings, named queries, periods, Twilio error table, callback parsing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dispatcher.credits.subscriptions import Plan, next_period, period_containing
from dispatcher.errors import InvalidPlan
from dispatcher.events.topology import Names
from dispatcher.queries import parse, q
from dispatcher.settings import Settings
from dispatcher.twilio.callbacks import read_call_status, read_sms_status
from dispatcher.twilio.errors import classify, code_class


def test_settings_from_env_and_secrets_not_in_repr() -> None:
    s = Settings.from_env({"DISPATCHER_TWILIO_AUTH_TOKEN": "s3cret-token",
                           "DISPATCHER_DATABASE_URL": "postgresql://u:pw@db/x",
                           "DISPATCHER_HTTP_PORT": "9000", "DISPATCHER_PREFETCH": "7"})
    assert (s.http_port, s.prefetch, s.twilio_auth_token) == (9000, 7, "s3cret-token")
    assert "s3cret-token" not in repr(s)
    assert "pw@" not in repr(s)


def test_named_queries_parse_and_reject_duplicates() -> None:
    assert parse("-- name: a\nSELECT 1;\n-- name: b\nSELECT 2") == {"a": "SELECT 1",
                                                                   "b": "SELECT 2"}
    with pytest.raises(ValueError, match="duplicate"):
        parse("-- name: a\nSELECT 1\n-- name: a\nSELECT 2")
    assert "reserve_batch" in q("reserve_batch")


@pytest.mark.parametrize(("plan", "now", "start", "end"), [
    (Plan(10, "monthly", 15), datetime(2026, 3, 20, tzinfo=UTC),
     datetime(2026, 3, 15, tzinfo=UTC), datetime(2026, 4, 15, tzinfo=UTC)),
    (Plan(10, "monthly", 15), datetime(2026, 3, 10, tzinfo=UTC),
     datetime(2026, 2, 15, tzinfo=UTC), datetime(2026, 3, 15, tzinfo=UTC)),
    # The 31st falls on the last day of shorter months.
    (Plan(10, "monthly", 31), datetime(2026, 2, 10, tzinfo=UTC),
     datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 2, 28, tzinfo=UTC)),
    (Plan(10, "annual", 1), datetime(2026, 6, 1, 12, tzinfo=UTC),
     datetime(2026, 6, 1, tzinfo=UTC), datetime(2027, 6, 1, tzinfo=UTC)),
    (Plan(10, "annual_monthly", 1), datetime(2026, 6, 3, tzinfo=UTC),
     datetime(2026, 6, 1, tzinfo=UTC), datetime(2026, 7, 1, tzinfo=UTC)),
])
def test_period_containing(plan: Plan, now: datetime, start: datetime, end: datetime) -> None:
    assert period_containing(plan, now) == (start, end)


def test_next_period_keeps_the_renewal_day_after_a_short_month() -> None:
    plan = Plan(10, "monthly", 31)
    start, end = next_period(plan, datetime(2026, 2, 28, tzinfo=UTC))
    assert (start.day, end) == (28, datetime(2026, 3, 31, tzinfo=UTC))


def test_invalid_plans() -> None:
    with pytest.raises(InvalidPlan):
        Plan(1, "weekly")
    with pytest.raises(InvalidPlan):
        Plan(1, "monthly", 0)


@pytest.mark.parametrize(("status", "code", "decision"), [
    (400, 21211, "failed"), (400, 21610, "failed"), (400, 21614, "failed"),
    (429, 20429, "retry"), (429, None, "retry"), (500, None, "unknown"),
    (503, 20500, "unknown"), (None, None, "unknown"), (401, 20003, "retry"),
    (400, 99999, "failed"),
])
def test_twilio_error_table(status: int | None, code: int | None, decision: str) -> None:
    assert classify(status, code)[0] == decision


def test_code_classes() -> None:
    assert [code_class(400), code_class(429), code_class(502), code_class(None),
            code_class(None, timed_out=True)] == ["4xx", "429", "5xx", "network", "timeout"]


def test_callback_parsing() -> None:
    sms = read_sms_status({"MessageSid": "SM1", "MessageStatus": "delivered",
                           "NumSegments": "3"})
    assert sms is not None
    assert (sms.sid, sms.status, sms.settle, sms.units) == ("SM1", "delivered", True, 3)
    call = read_call_status({"CallSid": "CA1", "CallStatus": "completed", "CallDuration": "61"})
    assert call is not None
    assert (call.status, call.units) == ("delivered", 2)
    busy = read_call_status({"CallSid": "CA2", "CallStatus": "busy"})
    assert busy is not None
    assert (busy.status, busy.settle) == ("failed", True)
    assert read_sms_status({"MessageStatus": "bogus"}) is None


def test_names_are_prefixed() -> None:
    names = Names("t1")
    assert names.work_queue("bulk") == "t1.bulk"
    assert all(n.startswith("t1.") for n in names.all_queues() + names.all_exchanges())
    assert [names.retry_delay(a) for a in (1, 2, 3, 4, 9)] == [1, 5, 30, 120, 120]
