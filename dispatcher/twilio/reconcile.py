"""Resolve jobs whose provider outcome is unknown: after a crash, a timeout or a 5xx.

A job left ``sending`` (the process died around the provider call) or ``unknown`` (timeout,
5xx) is never resent blindly. Once its status callback had every chance to arrive, we ask the
provider: if it holds the message, the job binds to it and settles; if a ``sending`` job is
not there, it was never sent and it goes out now. An ``unknown`` job the provider does not
know stays for an operator (``dispatcher jobs unresolved``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import structlog

from dispatcher.credits.ledger import Executor
from dispatcher.jobs.outcomes import Outcome
from dispatcher.jobs.store import JobStore, UnresolvedJob
from dispatcher.metrics import Metrics
from dispatcher.queries import q
from dispatcher.twilio.callbacks import apply_report
from dispatcher.twilio.lookup import ProviderLookup

log = structlog.get_logger(__name__)


class Reconciler:
    """One pass over stuck jobs; the service runs it periodically."""

    def __init__(self, db: Executor, jobs: JobStore, lookup: ProviderLookup,
                 resend: Callable[[bytes], Awaitable[Outcome]], metrics: Metrics, *,
                 grace: timedelta) -> None:
        self._db = db
        self._jobs = jobs
        self._lookup = lookup
        self._resend = resend
        self._metrics = metrics
        self._grace = grace

    async def run_once(self, now: datetime | None = None) -> dict[str, int]:
        """Resolve what can be resolved; returns counts by result."""
        cutoff = (now or datetime.now(UTC)) - self._grace
        counts = {"bound": 0, "resent": 0, "left_unknown": 0, "settled": 0}
        for job in await self._jobs.unresolved(cutoff):
            claimed = await self._db.fetchrow(q("claim_stuck_job"), job.job_id, job.status,
                                              cutoff)
            if claimed is None:
                continue  # another replica, or the job moved on meanwhile
            counts[await self._resolve(job)] += 1
        counts["settled"] = await self._settle_lost_callbacks(cutoff)
        self._metrics.unknown_jobs.set(await self._db.fetchval(q("unknown_job_count"), cutoff))
        if any(counts.values()):
            log.info("reconcile_pass", **counts)
        return counts

    async def _settle_lost_callbacks(self, cutoff: datetime) -> int:
        """Sent jobs whose final callback never came (we were down): ask for their status."""
        settled = 0
        for row in await self._db.fetch(q("unsettled_sent_jobs"), cutoff, 500):
            report = await self._lookup.fetch(row["kind"], row["provider_sid"])
            if report is not None and report.settle:
                job = await self._jobs.get(row["job_id"])
                assert job is not None
                await apply_report(self._jobs, job, report)
                settled += 1
        return settled

    async def _resolve(self, job: UnresolvedJob) -> str:
        candidates = await self._lookup.find(job.kind, job.payload, job.created_at)
        found = None
        for candidate in candidates:
            if candidate.sid and not await self._db.fetchval(q("sid_is_bound"), candidate.sid):
                found = candidate
                break
        if found is not None:
            row = await self._jobs.get(job.job_id)
            assert row is not None
            await apply_report(self._jobs, row, found)
            log.info("job_bound_to_provider", job_id=job.job_id, status=found.status)
            return "bound"
        if job.status == "sending":
            await self._jobs.retry_later(job.job_id, "not_sent_before_crash", None)
            await self._resend(json.dumps(job.payload).encode())
            log.info("job_resent_after_lookup", job_id=job.job_id)
            return "resent"
        return "left_unknown"
