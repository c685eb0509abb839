"""Per-sender pacing: at most N provider calls per second for each sending number.

``SenderRateLimiter`` paces this process alone (aiolimiter); ``shared_rate`` holds the rate
across replicas. Both serve waiting sends first come first served and honour ``wanted``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from aiolimiter import AsyncLimiter

# How often a waiting send asks whether it is still wanted.
GIVE_UP_CHECK_SECONDS = 0.05


class SenderLimiter(Protocol):
    """What the handler needs of a limiter."""

    async def acquire(self, sender: str, wanted: Callable[[], bool] | None = None) -> bool:
        """Wait for ``sender``'s turn; False if ``wanted`` said no first."""
        ...


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

    async def acquire(self, sender: str, wanted: Callable[[], bool] | None = None) -> bool:
        """Wait until ``sender`` may send once more; True once the turn is taken.

        With ``wanted``, a wait that is no longer wanted (its broadcast was canceled) gives its
        place up within ``GIVE_UP_CHECK_SECONDS`` and answers False without taking a turn.
        """
        limiter = self.limiter_for(sender)
        if wanted is None:
            await limiter.acquire()
            return True
        if not wanted():
            return False
        waiting = asyncio.ensure_future(limiter.acquire())
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=GIVE_UP_CHECK_SECONDS)
            if done:
                waiting.result()
                return True
            if not wanted():
                waiting.cancel()  # aiolimiter drops a cancelled waiter from its queue
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
                return False
