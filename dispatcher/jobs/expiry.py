"""The expiry sweep: waiting jobs and pending broadcast recipients past their ``expires_at``
end ``failed`` with reason ``expired``, releasing what they reserved (migration 0026).

Every replica runs it; the database decides (rows locked SKIP LOCKED under their account's
lock), so each job ends once. The clock is injectable: tests move time instead of sleeping.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from dispatcher.credits.ledger import Executor
from dispatcher.metrics import Metrics, kind_label
from dispatcher.queries import q

log = structlog.get_logger(__name__)


def utc_now() -> datetime:
    """The sweep's default clock."""
    return datetime.now(UTC)


class ExpirySweeper:
    """One pass ends everything due at the clock's now, in batches of ``batch``."""

    def __init__(self, db: Executor, metrics: Metrics | None = None, *,
                 clock: Callable[[], datetime] = utc_now, batch: int = 500) -> None:
        self._db = db
        self._metrics = metrics
        self._clock = clock
        self._batch = batch

    async def sweep(self) -> int:
        """End every waiting job and pending recipient due now; how many ended."""
        now = self._clock()
        by_kind: Counter[str] = Counter()
        by_status: Counter[str] = Counter()
        while True:
            rows = await self._db.fetch(q("expire_jobs"), now, self._batch)
            by_kind.update(row["expired_kind"] for row in rows)
            by_status.update(row["was_status"] for row in rows)
            if len(rows) < self._batch:
                break
        for broadcast in await self._db.fetch(q("expired_broadcasts"), now, 100):
            while True:
                ended = int(await self._db.fetchval(
                    q("expire_broadcast_pending"), broadcast["id"], now, self._batch) or 0)
                by_kind["sms"] += ended  # a broadcast's recipients count as sms
                by_status["pending"] += ended
                if ended < self._batch:
                    break
        if self._metrics is not None:
            for kind, count in by_kind.items():
                self._metrics.jobs.labels(kind=kind_label(kind), outcome="expired").inc(count)
        total = sum(by_kind.values())
        if total:
            log.info("jobs_expired", jobs=total, **{f"was_{k}": v for k, v in by_status.items()})
        return total
