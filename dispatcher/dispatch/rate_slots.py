"""A sender's turns as a GCRA bucket: one time per sender, so several replicas can share it.

The bucket is its theoretical arrival time ``tat``. Turns are ``interval`` (1 / rate) apart
and one may go up to ``tolerance`` ((burst - 1) * interval) before its place: that is the
burst. Taking ``count`` turns at once moves ``tat`` from ``max(tat, now)`` by
``count * interval`` in one write, and turn ``i`` of the take may go at
``max(now, max(tat, now) + i * interval - tolerance)``. Takes never overlap, so every
replica's turns together keep the rate, however the turns are split between them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from dispatcher.queries import q


@dataclass(frozen=True)
class Pace:
    """A rate and its burst, as the bucket uses them."""

    interval: float  # seconds between turns
    tolerance: float  # how early a turn may go: (burst - 1) turns' worth

    @classmethod
    def of(cls, per_second: float, burst: float | None = None) -> Pace:
        """``burst`` defaults to one second's worth, at least one (as the process limiter)."""
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        burst = burst if burst is not None else max(1.0, per_second)
        if burst < 1:
            raise ValueError("burst must be at least 1")
        return cls(1.0 / per_second, (burst - 1.0) / per_second)


@dataclass(frozen=True)
class Grant:
    """``count`` turns: turn ``i`` may go ``max(0, start + i * interval)`` seconds after the
    take (``start`` is negative while the bucket holds a burst)."""

    start: float
    count: int
    interval: float

    def delay(self, index: int) -> float:
        """Seconds after the take at which turn ``index`` may go."""
        return max(0.0, self.start + index * self.interval)


def take(tat: float | None, now: float, count: int, pace: Pace) -> tuple[float, Grant]:
    """The bucket's new ``tat`` and the turns granted for taking ``count`` at ``now``
    (``tat`` None: a sender never seen, whose bucket is full)."""
    if count < 1:
        raise ValueError("count must be at least 1")
    new_tat = (now if tat is None else max(tat, now)) + count * pace.interval
    return new_tat, grant_of(new_tat, now, count, pace)


def grant_of(new_tat: float, now: float, count: int, pace: Pace) -> Grant:
    """The turns of a take, from the ``tat`` it left and the time it was made (what the
    database's upsert returns)."""
    base = new_tat - count * pace.interval
    return Grant(base - pace.tolerance - now, count, pace.interval)


class SlotSource(Protocol):
    """Where senders' buckets live."""

    async def take(self, sender: str, count: int, pace: Pace) -> Grant:
        """Take ``count`` turns of ``sender``'s bucket."""
        ...


class PostgresSlots:
    """Buckets in PostgreSQL (``sender_rates``): one upsert per take, shared by replicas."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def take(self, sender: str, count: int, pace: Pace) -> Grant:
        """One round trip; errors (an outage) go to the caller as they are."""
        row = await self._pool.fetchrow(q("take_sender_slots"), sender, count, pace.interval)
        assert row is not None
        return grant_of(row["tat"], row["now"], count, pace)


class MemorySlots:
    """Buckets in this process (unit tests, or several limiters sharing one process)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[str, float] = {}
        self.takes = 0

    async def take(self, sender: str, count: int, pace: Pace) -> Grant:
        """Take at the clock's now."""
        self.takes += 1
        self._tats[sender], grant = take(self._tats.get(sender), self._clock(), count, pace)
        return grant
