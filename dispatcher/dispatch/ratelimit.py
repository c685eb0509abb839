"""Per-sender pacing: at most N provider calls per second for each sending number."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class SenderRateLimiter:
    """A token bucket per sender; ``acquire`` waits until that sender may send again."""

    def __init__(self, per_second: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self._rate = per_second
        self._burst = burst if burst is not None else max(1.0, per_second)
        self._buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, updated)
        self._lock = asyncio.Lock()
        self._clock = clock
        self._sleep = sleep

    async def acquire(self, sender: str, wanted: Callable[[], bool] = lambda: True) -> bool:
        """Take one token for ``sender``, sleeping as long as its bucket needs to refill.

        False, without a token, once ``wanted()`` is false (checked before each try): a send
        given up while it waited (its broadcast canceled) leaves the turn to the next one.
        """
        while True:
            if not wanted():
                return False
            async with self._lock:
                now = self._clock()
                tokens, updated = self._buckets.get(sender, (self._burst, now))
                tokens = min(self._burst, tokens + (now - updated) * self._rate)
                if tokens >= 1.0 - 1e-9:  # float rounding must not leave us a hair short
                    self._buckets[sender] = (max(tokens - 1.0, 0.0), now)
                    return True
                self._buckets[sender] = (tokens, now)
                wait = (1.0 - tokens) / self._rate
            await self._sleep(wait)
