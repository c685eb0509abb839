"""Provider calls in flight: at most ``limit`` at once, transactional (rank 0) waiters first.

Around provider calls, the bound is on the calls alone, not on whole jobs: a job reserves its
credits before it waits here and records its outcome after it leaves, so with more workers than
slots the database round trips of some jobs overlap the provider calls of others.
Waiters are served by rank (0 before 1), first come first served within a rank.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class SendSlots:
    """A counting semaphore whose waiters are ordered by rank, then arrival."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be positive")
        self._limit = limit
        self._held = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiting: Counter[int] = Counter()  # live waiters by rank
        self._order = itertools.count()

    @property
    def held(self) -> int:
        """How many slots are held now."""
        return self._held

    @property
    def waiting(self) -> int:
        """How many callers wait for a slot now."""
        return sum(self._waiting.values())

    @asynccontextmanager
    async def slot(self, rank: int) -> AsyncIterator[float]:
        """Hold one slot for the block; yields the seconds waited for it."""
        started = time.monotonic()
        await self._acquire(rank)
        try:
            yield time.monotonic() - started
        finally:
            self._release()

    async def _acquire(self, rank: int) -> None:
        ahead = any(count for r, count in self._waiting.items() if r <= rank)
        if self._held < self._limit and not ahead:
            self._held += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._order), future))
        self._waiting[rank] += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.cancelled():
                self._waiting[rank] -= 1  # its heap entry is skipped when it comes up
            else:
                self._release()  # the slot was handed over just as we were cancelled
            raise

    def _release(self) -> None:
        self._held -= 1
        while self._waiters:
            rank, _, future = self._waiters[0]
            if future.done():
                heapq.heappop(self._waiters)
                continue
            if self._held >= self._limit:
                return
            heapq.heappop(self._waiters)
            self._waiting[rank] -= 1
            self._held += 1
            future.set_result(None)
