"""Resolve jobs whose provider outcome is unknown: after a crash, a timeout or a 5xx.

A job left ``sending`` (the process died around the provider call) or ``unknown`` (timeout,
5xx) is never resent blindly. Once its status callback had every chance to arrive, we ask the
provider (see ``lookup``): if it holds the job's message or call, the job binds to it and
settles. A ``sending`` job is sent again only when the provider's complete answer leaves no
doubt that it never got it, and then not here: the job becomes ``retry_wait``, due at once, and
the retry sweeper sends it (a crash right after this decision loses nothing). A call the
provider holds but that cannot be told apart from another one between the same numbers is
never resent: it becomes ``unknown`` for an operator (``dispatcher jobs unresolved``), its
credits still reserved. An ``unknown`` job (timeout, 5xx) that the complete answer shows was
never created goes the same way as a ``sending`` one: ``retry_wait``, due at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from dispatcher.credits.ledger import Executor
from dispatcher.jobs.store import JobStore, UnresolvedJob
from dispatcher.metrics import OVERDUE_STATES, Metrics
from dispatcher.queries import q
from dispatcher.twilio.callbacks import apply_report
from dispatcher.twilio.lookup import Candidate, ProviderLookup

log = structlog.get_logger(__name__)

RESULTS = ("bound", "resent", "ambiguous", "left_unknown", "lookup_failed", "settled")


class Reconciler:
    """One pass over stuck jobs, ``concurrency`` lookups at a time; the service runs it
    periodically."""

    def __init__(self, db: Executor, jobs: JobStore, lookup: ProviderLookup, metrics: Metrics,
                 *, grace: timedelta, concurrency: int = 8,
                 live: Callable[[str], bool] = lambda _job_id: False) -> None:
        self._db = db
        # True for a job this process is still working on (waiting for its sender's turn or a
        # slot): its process is alive, so it is not stuck, however long the wait.
        self._live = live
        self._jobs = jobs
        self._lookup = lookup
        self._metrics = metrics
        self._grace = grace
        self._slots = asyncio.Semaphore(concurrency)

    async def run_once(self, now: datetime | None = None) -> dict[str, int]:
        """Resolve what can be resolved; returns counts by result."""
        cutoff = (now or datetime.now(UTC)) - self._grace
        counts = dict.fromkeys(RESULTS, 0)
        stuck = [j for j in await self._jobs.unresolved(cutoff) if not self._live(j.job_id)]
        for result in await asyncio.gather(*(self._claim_and_resolve(j, cutoff) for j in stuck)):
            if result is not None:
                counts[result] += 1
        counts["settled"] = await self._settle_lost_callbacks(cutoff)
        await self._refresh_gauges(cutoff)
        if any(counts.values()):
            log.info("reconcile_pass", **counts)
        return counts

    async def _refresh_gauges(self, cutoff: datetime) -> None:
        self._metrics.unknown_jobs.set(await self._db.fetchval(q("unknown_job_count"), cutoff))
        overdue = await self._db.fetchrow(q("overdue_job_counts"), cutoff)
        assert overdue is not None
        for state in OVERDUE_STATES:
            self._metrics.overdue_jobs.labels(status=state).set(overdue[state])

    async def _claim_and_resolve(self, job: UnresolvedJob, cutoff: datetime) -> str | None:
        async with self._slots:
            claimed = await self._db.fetchrow(q("claim_stuck_job"), job.job_id, job.status,
                                              cutoff)
            if claimed is None:
                return None  # another replica, or the job moved on meanwhile
            try:
                return await self._resolve(job)
            except Exception:
                # Claimed, so the next pass after the grace tries again; nothing was decided.
                log.exception("reconcile_job_failed", job_id=job.job_id)
                return "lookup_failed"

    async def _settle_lost_callbacks(self, cutoff: datetime) -> int:
        """Sent jobs whose final callback never came (we were down): ask for their status."""
        rows = await self._db.fetch(q("unsettled_sent_jobs"), cutoff, 500)
        settled = await asyncio.gather(*(self._settle_one(row) for row in rows))
        return sum(settled)

    async def _settle_one(self, row: Any) -> int:
        async with self._slots:
            try:
                report = await self._lookup.fetch(row["kind"], row["provider_sid"])
                if report is None or not report.settle:
                    return 0
                job = await self._jobs.get(row["job_id"])
                assert job is not None
                await apply_report(self._jobs, job, report)
                return 1
            except Exception:
                log.exception("reconcile_settle_failed", job_id=row["job_id"])
                return 0

    async def _resolve(self, job: UnresolvedJob) -> str:
        bound = log.bind(job_id=job.job_id, account_id=job.account_id, kind=job.kind)
        try:
            candidates = await self._lookup.find(job.kind, job.payload,
                                                 job.sending_at or job.created_at)
        except Exception as exc:
            bound.warning("reconcile_lookup_failed", error=type(exc).__name__)
            return "lookup_failed"
        owned = {r["provider_sid"] for r in await self._db.fetch(
            q("bound_sids"), [c.status.sid for c in candidates if c.status.sid])}
        unclaimed = [c for c in candidates if c.status.sid and c.status.sid not in owned]
        if unclaimed and not await self._identifies(job, unclaimed):
            if job.status == "sending":
                await self._jobs.unknown(job.job_id, "provider_lookup_ambiguous")
            bound.warning("job_outcome_ambiguous", candidates=len(unclaimed))
            return "ambiguous"
        if unclaimed:
            # Newest first: the oldest one in the window is the closest to our create.
            found = unclaimed[-1]
            row = await self._jobs.get(job.job_id)
            assert row is not None
            await apply_report(self._jobs, row, found.status)
            bound.info("job_bound_to_provider", status=found.status.status)
            return "bound"
        if job.status == "sending":
            await self._jobs.retry_later(job.job_id, "not_sent_before_crash", None, 0.0)
            bound.info("job_resent_after_lookup")
            return "resent"
        now = await self._jobs.retry_not_created(job.job_id, "not_created_by_provider")
        if now == "retry_wait":
            bound.info("job_resent_after_lookup")
            return "resent"
        return "left_unknown"

    async def _identifies(self, job: UnresolvedJob, unclaimed: list[Candidate]) -> bool:
        """True when the candidates can only be this job's create.

        An SMS candidate has the job's exact body. A call has nothing but its numbers: it is
        the job's only if it is the one unclaimed call between them and no other unresolved
        call job could own it.
        """
        if job.kind == "sms":
            return True
        if len(unclaimed) != 1:
            return False
        others = await self._db.fetchval(q("unresolved_calls_to"), job.job_id,
                                         job.payload.get("to"), job.payload.get("from"))
        return not others
