"""Per-account ordering: jobs of one account begin in the order they were taken off the queue.

Workers take messages in queue order and ask for their account's turn before their first
``await``, so the FIFO lock keeps arrival order. The turn is held through pricing and the
sender's rate limit, until the job is queued for its begin in the group commit, which keeps an
account's jobs in queue order from there (keyed batches, stable sort by account).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class AccountTurns:
    """A FIFO lock per account, dropped when nobody waits on it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def turn(self, account: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(account, (asyncio.Lock(), 0))
        self._locks[account] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[account]
            if users == 1:
                del self._locks[account]
            else:
                self._locks[account] = (lock, users - 1)
