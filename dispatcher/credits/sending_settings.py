"""Per-account sending settings the handler needs on every job, kept fresh for a few seconds."""

from __future__ import annotations

import time

from dispatcher.credits.ledger import Executor
from dispatcher.pricing.quiet_hours import QuietHours
from dispatcher.queries import q


class SmartEncodingAccounts:
    """Which accounts have Smart Encoding on, reloaded when older than ``max_age_seconds``.

    One query every few seconds instead of one per job: a change shows within that time, and
    a job is priced and sent with the same text either way (the encoded body is what is stored).
    """

    def __init__(self, db: Executor, max_age_seconds: float = 5.0) -> None:
        self._db = db
        self._max_age = max_age_seconds
        self._accounts: frozenset[str] | None = None
        self._loaded_at = 0.0

    async def enabled(self, account: str) -> bool:
        """Whether ``account`` has Smart Encoding on."""
        if self._accounts is None or time.monotonic() - self._loaded_at > self._max_age:
            rows = await self._db.fetch(q("smart_encoding_accounts"))
            self._accounts = frozenset(row["id"] for row in rows)
            self._loaded_at = time.monotonic()
        return account in self._accounts


class QuietHoursAccounts:
    """Each account's quiet hours (None: none), reloaded when older than ``max_age_seconds``.

    Like ``SmartEncodingAccounts``: one query every few seconds instead of one per job.
    """

    def __init__(self, db: Executor, max_age_seconds: float = 5.0) -> None:
        self._db = db
        self._max_age = max_age_seconds
        self._windows: dict[str, QuietHours] | None = None
        self._loaded_at = 0.0

    async def window(self, account: str) -> QuietHours | None:
        """``account``'s quiet hours, or None."""
        if self._windows is None or time.monotonic() - self._loaded_at > self._max_age:
            rows = await self._db.fetch(q("quiet_hours_accounts"))
            self._windows = {row["id"]: QuietHours(row["quiet_hours_start"],
                                                   row["quiet_hours_end"]) for row in rows}
            self._loaded_at = time.monotonic()
        return self._windows.get(account)
