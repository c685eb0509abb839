"""Per-sender pacing held across replicas: turns taken from a shared bucket a few at a time.

Each replica takes a sender's turns from its bucket (``rate_slots``; in PostgreSQL in
production) in batches, so the database sees one round trip per batch, not per send. Locally,
waiting sends are served first come first served, as by the per-process limiter. A batch is
sized by demand — the sends waiting, or as many as this replica used for the sender in the last
``keep_seconds``, whichever is more, at most ``lease_seconds`` of the rate — so a replica at the
limit takes one batch per lease, a steady quiet sender about one per ``keep_seconds``, and no
replica hoards turns the others could use. A turn not used within ``keep_seconds`` after its
time is dropped. A replica holds one batch at most, so turns used late can put a window at most
one batch per replica (``lease_seconds`` of the rate each) above what the bucket allows. A take
that fails (the database is away) fails the sends waiting for it, as any other database call of
theirs would: their callers wait the outage out and try again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from dispatcher.dispatch.rate_slots import Grant, Pace, SlotSource
from dispatcher.dispatch.ratelimit import GIVE_UP_CHECK_SECONDS
from dispatcher.loops import is_outage

log = structlog.get_logger(__name__)

# A batch covers at most this much of the rate.
LEASE_SECONDS = 0.1
# An unused turn is kept this long after its time; demand is counted over as long.
KEEP_SECONDS = 1.0


@dataclass
class _Run:
    """The turns of one take not yet used, in local monotonic time."""

    taken_at: float
    grant: Grant
    next: int = 0

    def due(self) -> float:
        """When the next turn may go."""
        return self.taken_at + self.grant.delay(self.next)

    def drop_expired(self, now: float, keep: float) -> None:
        """Skip the turns whose time is more than ``keep`` ago."""
        if self.empty or self.due() + keep >= now:
            return
        g = self.grant
        # The first turn still valid: taken_at + start + i * interval >= now - keep.
        self.next = max(self.next + 1,
                        math.ceil((now - keep - self.taken_at - g.start) / g.interval))
        while not self.empty and self.due() + keep < now:  # float rounding
            self.next += 1

    @property
    def empty(self) -> bool:
        """True once every turn is used or dropped."""
        return self.next >= self.grant.count


@dataclass
class _Sender:
    """One sender's local state: its unused turns, who waits, and recent demand."""

    run: _Run | None = None
    waiters: deque[asyncio.Future[bool]] = field(default_factory=deque)
    driver: asyncio.Task[None] | None = None
    window_start: float = 0.0
    window_count: int = 0
    previous_count: int = 0


class SharedSenderRateLimiter:
    """Sender turns shared with every replica using the same ``SlotSource``."""

    def __init__(self, slots: SlotSource, per_second: float, burst: float | None = None, *,
                 lease_seconds: float = LEASE_SECONDS, keep_seconds: float = KEEP_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._slots = slots
        self._pace = Pace.of(per_second, burst)
        self._keep = keep_seconds
        self._batch = max(1, int(per_second * lease_seconds))
        self._clock = clock
        self._senders: dict[str, _Sender] = {}
        self._outage = False
        self.takes = 0  # round trips to the shared bucket so far

    async def acquire(self, sender: str, wanted: Callable[[], bool] | None = None) -> bool:
        """Wait until ``sender`` may send once more; True once the turn is taken.

        With ``wanted``, a wait that is no longer wanted (its broadcast was canceled) gives its
        place up within ``GIVE_UP_CHECK_SECONDS`` and answers False without taking a turn.
        """
        if wanted is not None and not wanted():
            return False
        state = self._senders.get(sender)
        if state is None:
            state = self._senders[sender] = _Sender()
        now = self._clock()
        self._count(state, now)
        if not state.waiters and self._turn_now(state, now):
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        state.waiters.append(future)
        if state.driver is None:
            state.driver = asyncio.create_task(self._drive(sender, state),
                                               name="sender-rate")
        try:
            if wanted is None:
                return await future
            while True:
                done, _ = await asyncio.wait({future}, timeout=GIVE_UP_CHECK_SECONDS)
                if done:
                    return future.result()
                if not wanted():
                    future.cancel()  # the driver skips it: the turn goes to the next one
                    return False
        except asyncio.CancelledError:
            future.cancel()
            raise

    def _count(self, state: _Sender, now: float) -> None:
        """Acquisitions in this window and the one before: the size of the next take."""
        if now - state.window_start >= self._keep:
            recent = now - state.window_start < 2 * self._keep
            state.previous_count = state.window_count if recent else 0
            state.window_start, state.window_count = now, 0
        state.window_count += 1

    def _turn_now(self, state: _Sender, now: float) -> bool:
        """Use a turn already taken if one is due now."""
        run = state.run
        if run is None:
            return False
        run.drop_expired(now, self._keep)
        if run.empty or run.due() > now:
            return False
        run.next += 1
        return True

    async def _drive(self, sender: str, state: _Sender) -> None:
        """Hand turns to the waiting sends in order, taking more when none is left."""
        try:
            while True:
                while state.waiters and state.waiters[0].done():
                    state.waiters.popleft()  # gave up
                if not state.waiters:
                    return
                now = self._clock()
                run = state.run
                if run is not None:
                    run.drop_expired(now, self._keep)
                if run is None or run.empty:
                    await self._take(sender, state)
                    continue
                due = run.due()
                if due > now:
                    await asyncio.sleep(due - now)
                    continue
                run.next += 1
                state.waiters.popleft().set_result(True)
        except Exception as exc:
            for waiter in state.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            state.waiters.clear()
        except asyncio.CancelledError:
            for waiter in state.waiters:
                waiter.cancel()
            state.waiters.clear()
            raise
        finally:
            state.driver = None

    async def _take(self, sender: str, state: _Sender) -> None:
        wanted = max(len(state.waiters), state.window_count, state.previous_count)
        count = min(self._batch, wanted)
        self.takes += 1
        try:
            grant = await self._slots.take(sender, count, self._pace)
        except Exception as exc:
            if is_outage(exc) and not self._outage:
                self._outage = True
                log.warning("sender_rate_unreachable", error=type(exc).__name__)
            raise
        if self._outage:
            self._outage = False
            log.info("sender_rate_reachable_again")
        state.run = _Run(self._clock(), grant)
