"""Per-sender pacing: at most N provider calls per second for each sending number (aiolimiter)."""

from __future__ import annotations

from aiolimiter import AsyncLimiter


class SenderRateLimiter:
    """One leaky bucket per sender; ``acquire`` waits, first come first served, for its turn.

    ``burst`` sends may go at once after an idle spell (default: one second's worth, at least
    one); after that one every ``1 / per_second`` seconds.
    """

    def __init__(self, per_second: float, burst: float | None = None) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self._burst = burst if burst is not None else max(1.0, per_second)
        self._period = self._burst / per_second
        self._limiters: dict[str, AsyncLimiter] = {}

    def limiter_for(self, sender: str) -> AsyncLimiter:
        """The sender's bucket (made on first use)."""
        limiter = self._limiters.get(sender)
        if limiter is None:
            limiter = self._limiters[sender] = AsyncLimiter(self._burst, self._period)
        return limiter

    async def acquire(self, sender: str) -> None:
        """Wait until ``sender`` may send once more."""
        await self.limiter_for(sender).acquire()
