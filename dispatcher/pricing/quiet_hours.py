"""Quiet hours: a daily window in the recipient's local time in which bulk messages wait.

The recipient's time zones come from the number (``phonenumbers.timezone``). A number that
maps to several zones (a UK mobile: London, Jersey, Guernsey, Man; a Russian one: eleven
hours apart) is read the safe way: it is quiet when the window is open in *any* of its zones,
and it may go at the first moment the window is closed in *all* of them. When its zones are
too far apart for such a moment to exist, it goes at the latest window end among them. A
number whose zone is unknown has no quiet hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import phonenumbers
from phonenumbers import timezone as number_timezones
from phonenumbers.tzdata import TIMEZONE_DATA, TIMEZONE_LONGEST_PREFIX

_UNKNOWN = "Etc/Unknown"


@dataclass(frozen=True, slots=True)
class QuietHours:
    """A daily window [start, end) of local wall-clock time; crosses midnight when end < start."""

    start: time
    end: time

    def __post_init__(self) -> None:
        if self.start == self.end:
            raise ValueError("quiet hours: start and end must differ")

    def contains(self, local: time) -> bool:
        """Whether this wall-clock time is inside the window."""
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def window_end(self, at: datetime, zone: ZoneInfo) -> datetime | None:
        """When the window open at ``at`` in ``zone`` closes (UTC), or None if it is closed.

        On a DST day the end is the wall-clock end of that day: an hour more or less of
        quiet; an end inside the spring-forward gap is the first instant after the gap.
        """
        local = at.astimezone(zone)
        wall = local.time().replace(tzinfo=None)
        if not self.contains(wall):
            return None
        day = local.date()
        if self.start > self.end and wall >= self.start:
            day += timedelta(days=1)
        end = datetime.combine(day, self.end, tzinfo=zone).astimezone(UTC)
        # A wall time in a gap reads with the offset before it, which may land before ``at``.
        return max(end, at.astimezone(UTC) + timedelta(microseconds=1))

    def quiet_until(self, zones: tuple[ZoneInfo, ...], at: datetime) -> datetime | None:
        """The first moment from ``at`` when the window is closed in every zone (UTC), or None
        when it is closed in all of them now."""
        until = at.astimezone(UTC)
        moved = False
        for _ in range(2 * len(zones) + 2):
            ends = [end for zone in zones if (end := self.window_end(until, zone)) is not None]
            if not ends:
                return until if moved else None
            until, moved = max(ends), True
        return until  # zones too far apart: the latest window end among them


@lru_cache(maxsize=65536)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _longest_prefix(digits: str) -> tuple[str, ...] | None:
    for length in range(min(len(digits), TIMEZONE_LONGEST_PREFIX), 0, -1):
        found = TIMEZONE_DATA.get(digits[:length])
        if found is not None:
            return tuple(found)
    return None


def _country_zones(digits: str) -> tuple[str, ...] | None:
    """The zones of the number's calling code (1 to 3 digits) as a whole."""
    for length in (1, 2, 3):
        found = TIMEZONE_DATA.get(digits[:length])
        if found is not None:
            return tuple(found)
    return None


@lru_cache(maxsize=131072)
def zones_for(number: str) -> tuple[ZoneInfo, ...]:
    """The time zones of an E.164 number, as ``time_zones_for_number`` gives them; empty when
    libphonenumber does not know them.

    That function takes ~0.2 ms, mostly to find the number's type (a non-geographic type gets
    its country's zones, a geographic one its prefix's); when the prefix's zones are the
    country's anyway, the type cannot matter and the table answers alone.
    """
    digits = number[1:]
    by_prefix = _longest_prefix(digits)
    if by_prefix is not None and by_prefix == _country_zones(digits):
        names: tuple[str, ...] = by_prefix
    else:
        try:
            names = tuple(number_timezones.time_zones_for_number(phonenumbers.parse(number)))
        except phonenumbers.NumberParseException:
            return ()
    return tuple(_zone(name) for name in names if name != _UNKNOWN)


def parse_clock(text: str) -> time:
    """``"21:00"`` -> ``time(21, 0)``; ValueError for anything else than HH:MM."""
    hours, sep, minutes = text.partition(":")
    if not (sep and len(hours) == 2 and len(minutes) == 2 and hours.isdigit()
            and minutes.isdigit()):
        raise ValueError("use HH:MM, e.g. 21:00")
    return time(int(hours), int(minutes))
