"""The service's clock: injectable, so hourly windows and calendar months can be tested fast."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

Clock = Callable[[], datetime]
HOUR = timedelta(hours=1)


def utc_now() -> datetime:
    """The real clock."""
    return datetime.now(UTC)


def month_of(at: datetime) -> str:
    """The calendar month (UTC) of an instant, ``YYYY-MM``."""
    return at.astimezone(UTC).strftime("%Y-%m")


def month_start(at: datetime) -> datetime:
    """The first instant of the instant's calendar month (UTC)."""
    return at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month_start(at: datetime) -> datetime:
    """The first instant of the next calendar month (UTC): when a monthly cap resets."""
    start = month_start(at)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(
        month=start.month + 1)
