"""Per-sender pacing: at most N provider calls per second for each sending number."""

from __future__ import annotations

import asyncio
import time


class SenderRateLimiter:
    """A token bucket per sender; ``acquire`` waits until that sender may send again."""

    def __init__(self, per_second: float, burst: float | None = None) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self._rate = per_second
        self._burst = burst if burst is not None else max(1.0, per_second)
        self._buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, updated)
        self._lock = asyncio.Lock()

    async def acquire(self, sender: str) -> None:
        """Take one token for ``sender``, sleeping as long as its bucket needs to refill."""
        while True:
            async with self._lock:
                now = time.monotonic()
                tokens, updated = self._buckets.get(sender, (self._burst, now))
                tokens = min(self._burst, tokens + (now - updated) * self._rate)
                if tokens >= 1.0:
                    self._buckets[sender] = (tokens - 1.0, now)
                    return
                self._buckets[sender] = (tokens, now)
                wait = (1.0 - tokens) / self._rate
            await asyncio.sleep(wait)
