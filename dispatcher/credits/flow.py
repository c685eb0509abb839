"""The ``dispatcher_credits_total`` counters, read from the ledger rather than from code paths.

Credits move in plpgsql (single and batched reservations, releases of held jobs, settlement,
grants from the billing service, renewals), so the ledger is the one place that sees them all.
Every interval the sampler sums the rows added since its last pass, one interval behind the
newest row so that transactions still committing below it are counted too. The counters are
database-wide, like the held-jobs gauges: with several replicas, aggregate them with ``max``.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

from dispatcher.metrics import CREDIT_OPERATIONS, Metrics
from dispatcher.queries import q

log = structlog.get_logger(__name__)


class CreditFlowSampler:
    """Adds the credits moved by new ledger rows to the metrics, pass by pass."""

    def __init__(self, pool: asyncpg.Pool, metrics: Metrics) -> None:
        self._pool = pool
        self._metrics = metrics
        self._counted_upto: int | None = None  # rows up to this id are counted
        self._newest: int = 0  # the newest id at the previous pass: counted at the next

    async def sample(self) -> None:
        """One pass: count the rows between the last two high-water marks."""
        newest = int(await self._pool.fetchval(q("ledger_high_water")))
        if self._counted_upto is None:
            # Count only what moves while this process runs.
            self._counted_upto = self._newest = newest
            return
        upto = self._newest
        if upto > self._counted_upto:
            row = await self._pool.fetchrow(q("ledger_flow"), self._counted_upto, upto)
            assert row is not None
            for operation in CREDIT_OPERATIONS:
                if row[operation]:
                    self._metrics.credits.labels(operation=operation).inc(row[operation])
            self._counted_upto = upto
        self._newest = newest

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Sample every ``interval`` seconds until ``stop``; a failed pass is retried."""
        while not stop.is_set():
            try:
                await self.sample()
            except (OSError, asyncpg.PostgresError, TimeoutError):
                log.warning("credit_flow_sample_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
