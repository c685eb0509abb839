"""Send ``retry_wait`` jobs when they are due: the durable owner of every retry decision.

Whoever decides that a job must be sent again (a 429 on a released job or a broadcast
recipient, the reconciler finding that a crashed send never reached the provider) only commits
``retry_wait`` with a due time. This sweeper claims due jobs in one statement (``sending``, a new
attempt; SKIP LOCKED, so replicas share them) and sends each through the handler's path for
already reserved jobs. A crash at any point leaves either a due ``retry_wait`` job (claimed
again here) or a ``sending`` one (the reconciler's), never a job nobody looks at.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

from dispatcher.events.listener import DATABASE_ERRORS
from dispatcher.jobs.outcomes import Outcome
from dispatcher.metrics import Metrics, kind_label
from dispatcher.queries import q

log = structlog.get_logger(__name__)

SendReleased = Callable[[bytes, int], Awaitable[Outcome]]


class RetrySweeper:
    """Claims due ``retry_wait`` jobs and sends them, at most ``concurrency`` at a time."""

    def __init__(self, pool: asyncpg.Pool, send: SendReleased, metrics: Metrics, *,
                 interval: float = 1.0, batch: int = 100, concurrency: int = 50) -> None:
        self._pool = pool
        self._send = send
        self._metrics = metrics
        self._interval = interval
        self._batch = batch
        self._concurrency = concurrency
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``interval`` until ``stop``, then let the sends in flight finish."""
        try:
            while not stop.is_set():
                try:
                    claimed = await self.sweep_once()
                except DATABASE_ERRORS as exc:
                    log.warning("retry_sweep_failed", error=type(exc).__name__)
                    claimed = 0
                if not claimed or len(self._in_flight) >= self._concurrency:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=self._interval)
        finally:
            if self._in_flight:
                await asyncio.wait(set(self._in_flight))

    async def sweep_once(self) -> int:
        """Claim one batch of due jobs and start sending them; returns how many."""
        # Only claim what can start now: a claimed job waits in `sending`, where a long wait
        # would look like a crash to the reconciler.
        free = self._concurrency - len(self._in_flight)
        if free <= 0:
            return 0
        rows = await self._pool.fetch(q("claim_due_retries"), min(free, self._batch))
        for row in rows:
            self._metrics.jobs.labels(kind=kind_label(row["kind"]), outcome="retried").inc()
            task = asyncio.create_task(self._send_one(row["job_id"], row["payload"],
                                                      row["attempts"]), name="retry-send")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        if rows:
            log.info("retries_claimed", jobs=len(rows))
        return len(rows)

    async def _send_one(self, job_id: str, payload: str, attempt: int) -> None:
        try:
            await self._send(payload.encode(), attempt)
        except Exception:
            # The job stays `sending` with its credits reserved: the reconciler's to resolve.
            log.exception("retry_send_failed", job_id=job_id)
