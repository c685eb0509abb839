"""Release jobs and broadcasts that waited for their time: ``send_at``, or quiet hours.

A short poll of PostgreSQL (an index on the due time) finds what is due: a scheduled broadcast
starts running (the broadcast runner reserves it batch by batch); a waiting job is reserved in
the database and sent here like a job released from hold (``send_released``), or held if its
account cannot pay. Every claim is decided by a locked row, so with several replicas each job
is released once; everything waits in PostgreSQL, so a restart loses nothing. The clock is
injectable: tests move time instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog

from dispatcher.jobs.outcomes import Outcome
from dispatcher.metrics import Metrics, kind_label
from dispatcher.queries import q

log = structlog.get_logger(__name__)

SendReleased = Callable[[bytes, int], Awaitable[Outcome]]
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The real clock."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Released:
    """What one pass released: jobs sent, jobs held for credits, broadcasts started."""

    sent: int = 0
    held: int = 0
    broadcasts: int = 0


class Releaser:
    """Polls for due waiting jobs and scheduled broadcasts and releases each exactly once."""

    def __init__(self, pool: asyncpg.Pool, send_released: SendReleased, metrics: Metrics, *,
                 wake_broadcasts: Callable[[], None] = lambda: None, clock: Clock = utc_now,
                 interval_seconds: float = 1.0, batch: int = 100) -> None:
        self._pool = pool
        self._send = send_released
        self._metrics = metrics
        self._wake_broadcasts = wake_broadcasts
        self._clock = clock
        self._interval = interval_seconds
        self._batch = batch

    async def run(self, stop: asyncio.Event) -> None:
        """A pass every ``interval_seconds`` until ``stop``."""
        while not stop.is_set():
            await self.release_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._interval)

    async def release_due(self) -> Released:
        """Release everything due now (batch after batch), sending the released jobs."""
        now = self._clock()
        started = await self._pool.fetch(q("release_due_broadcasts"), now)
        for row in started:
            log.info("broadcast_released", broadcast_id=row["id"])
        if started:
            self._wake_broadcasts()
        sent = held = 0
        while True:
            rows = await self._pool.fetch(q("release_due_jobs"), now, self._batch)
            released = [r for r in rows if r["outcome"] == "released"]
            held += sum(1 for r in rows if r["outcome"] == "held")
            for row in released:
                self._metrics.jobs.labels(kind=kind_label(row["kind"]),
                                          outcome="released").inc()
            # Sent side by side: each waits for its sender's turn and a provider slot, and a
            # crash in between leaves it `sending` for the reconciler, like a resumed job.
            results = await asyncio.gather(
                *(self._send(r["payload"].encode(), r["attempts"]) for r in released),
                return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    log.error("released_send_failed", error=type(result).__name__)
            sent += len(released)
            if len(rows) < self._batch:
                break
        if sent or held:
            log.info("waiting_jobs_released", sent=sent, held=held)
        return Released(sent, held, len(started))
