"""The rates table, read from PostgreSQL and kept fresh for a few seconds at a time."""

from __future__ import annotations

import time

from dispatcher.credits.ledger import Executor
from dispatcher.pricing.quotes import RateTable
from dispatcher.queries import q


class RateCache:
    """Serves a ``RateTable``, reloading it when older than ``max_age_seconds``."""

    def __init__(self, db: Executor, max_age_seconds: float = 5.0) -> None:
        self._db = db
        self._max_age = max_age_seconds
        self._table: RateTable | None = None
        self._loaded_at = 0.0

    async def get(self) -> RateTable:
        """The current rates (operators' changes show within ``max_age_seconds``)."""
        if self._table is None or time.monotonic() - self._loaded_at > self._max_age:
            rows = await self._db.fetch(q("list_rates"))
            self._table = RateTable([(r["channel"], r["country"], r["credits"]) for r in rows])
            self._loaded_at = time.monotonic()
        return self._table
