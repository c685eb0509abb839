"""The job state machine in PostgreSQL: begin (reserve or hold), then the provider's outcome.

Each method is one plpgsql call, so a job's status and its credits always change together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from dispatcher.credits.ledger import Executor
from dispatcher.queries import q

# country_not_allowed, price_above_limit: refused by the account's spend guards (migration
# 0023), nothing reserved; the caller dead-letters the job.
BeginOutcome = Literal["send", "held", "duplicate", "conflict", "unknown_account", "expired",
                       "scheduled", "deferred", "canceled", "country_not_allowed",
                       "price_above_limit"]
FINAL_STATUSES = frozenset({"delivered", "undelivered", "failed", "expired", "canceled"})


@dataclass(frozen=True)
class NewJob:
    """What the database needs to start one provider send."""

    job_id: str
    account_id: str
    kind: Literal["sms", "call"]
    priority: str
    payload: dict[str, Any] | str  # or its JSON text, when the caller has it encoded already
    estimate: int
    country: str
    units: int
    rate: int
    broadcast_id: str | None = None


@dataclass(frozen=True)
class Begin:
    """What ``begin`` decided; ``status`` is the job's status afterwards."""

    outcome: BeginOutcome
    status: str | None
    attempts: int


@dataclass(frozen=True)
class Claim:
    """Whether a job was claimed for its provider call; else ``status`` says where it is
    (``canceled`` with its broadcast, ``sending`` at a later attempt: taken over).
    ``broadcast_id``: the broadcast whose recipient the job is, if any."""

    claimed: bool
    status: str | None
    broadcast_id: str | None = None


@dataclass(frozen=True)
class UnresolvedJob:
    """A job whose provider outcome nobody knows yet (crash while sending, timeout, 5xx)."""

    job_id: str
    account_id: str
    kind: str
    status: str
    attempts: int
    provider_sid: str | None
    reason: str | None
    payload: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    sending_at: datetime | None = None
    retry_at: datetime | None = None


class JobStore:
    """Moves jobs through their states; every transition is atomic with its credits."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def begin(self, job: NewJob) -> Begin:
        """Reserve and mark ``sending``, or hold, or report a duplicate — one transaction."""
        row = await self._db.fetchrow(
            q("begin_job"), job.job_id, job.account_id, job.kind, job.priority,
            _json(job.payload), job.estimate, job.country, job.units, job.rate,
            job.broadcast_id)
        return Begin(row["outcome"], row["status"], row["attempts"])

    async def begin_expired(self, job: NewJob) -> Begin:
        """A job received after its ``expires_at``: recorded failed/expired, never reserved
        (outcome ``expired``); or a duplicate, a conflict, an unknown account."""
        row = await self._db.fetchrow(
            q("begin_expired_job"), job.job_id, job.account_id, job.kind, job.priority,
            _json(job.payload), job.estimate, job.country, job.units, job.rate)
        return Begin(row["outcome"], row["status"], row["attempts"])

    async def begin_many(self, jobs: list[NewJob]) -> list[Begin]:
        """``begin`` for several jobs in one round trip and one transaction, in the given order.

        Callers order the jobs by account so that account rows are locked in a consistent order.
        """
        rows = await self._db.fetch(
            q("begin_jobs"), [j.job_id for j in jobs], [j.account_id for j in jobs],
            [j.kind for j in jobs], [j.priority for j in jobs],
            [_json(j.payload) for j in jobs], [j.estimate for j in jobs],
            [j.country for j in jobs], [j.units for j in jobs], [j.rate for j in jobs],
            [j.broadcast_id for j in jobs])
        return [Begin(r["outcome"], r["status"], r["attempts"]) for r in rows]

    async def wait(self, job: NewJob, status: str, not_before: datetime, reason: str) -> Begin:
        """Store a job that waits for its time (``scheduled``/``deferred``), nothing reserved;
        or report a duplicate / conflicting id like ``begin``."""
        row = await self._db.fetchrow(
            q("wait_job"), job.job_id, job.account_id, job.kind, job.priority,
            _json(job.payload), job.estimate, job.country, job.units, job.rate, status,
            not_before, reason)
        return Begin(row["outcome"], row["status"], row["attempts"])

    async def cancel_request(self, request_id: str, account_id: str, target: str) -> str:
        """An AMQP cancel, once per id: 'canceled', the target's status, 'unknown',
        'duplicate', 'conflict' or 'unknown_account'."""
        return str(await self._scalar("cancel_request", request_id, account_id, target))

    async def cancel_target(self, account_id: str, target: str) -> str:
        """Cancel a waiting job or a broadcast of the account: 'canceled', the target's
        status when it is past waiting, or 'unknown'."""
        return str(await self._scalar("cancel_target", account_id, target))

    async def accepted_many(self, accepted: list[tuple[str, str]]) -> list[str]:
        """``accepted`` for several (job id, SID) pairs in one round trip, in the given order."""
        rows = await self._db.fetch(q("jobs_accepted"), [j for j, _ in accepted],
                                    [sid for _, sid in accepted])
        return [str(r["status"]) for r in rows]

    async def accepted(self, job_id: str, sid: str) -> str:
        """The provider accepted the create: bind its SID, status ``sent``."""
        return str(await self._scalar("job_accepted", job_id, sid))

    async def not_sent(self, job_id: str, reason: str, error_code: int | None = None,
                       status: str = "failed") -> str:
        """The provider definitely did not send it: final status, credits released."""
        return str(await self._scalar("job_not_sent", job_id, status, reason, error_code))

    async def unknown(self, job_id: str, reason: str) -> str:
        """The create may or may not have sent: keep the credits, wait for the provider."""
        return str(await self._scalar("job_unknown", job_id, reason))

    async def claim_for_send(self, job_id: str, attempt: int) -> Claim:
        """Claim the provider call of a job still ``sending`` at ``attempt``: ours to send now.

        Once claimed, a broadcast cancel leaves the job alone; until then it may cancel it.
        """
        row = await self._db.fetchrow(q("claim_for_send"), job_id, attempt)
        status = row["status"]
        return Claim(status == "claimed", None if status is None else str(status),
                     row["broadcast_id"])

    async def dead_lettered(self, job_id: str, account_id: str, kind: str, reason: str,
                            metadata: dict[str, str]) -> None:
        """Tell subscribers a job was refused before it existed (a ``dead_lettered`` event)."""
        await self._db.fetchval(q("job_dead_lettered"), job_id, account_id, kind, reason,
                                json.dumps(metadata))

    async def retry_later(self, job_id: str, reason: str, error_code: int | None,
                          delay_seconds: float = 0.0) -> str:
        """Refused before sending (rate limit): keep the credits, due again after the delay.

        The retry sweeper sends it when due (see ``dispatch.retries``), whoever decided it.
        """
        return str(await self._scalar("job_retry_later", job_id, reason, error_code,
                                      float(delay_seconds)))

    async def retry_not_created(self, job_id: str, reason: str) -> str:
        """An ``unknown`` job the provider certainly never created: due again at once."""
        return str(await self._scalar("job_retry_not_created", job_id, reason))

    async def provider_status(self, job_id: str, sid: str | None, status: str, *,
                              cost: int | None = None, error_code: int | None = None,
                              settle: bool = False) -> str:
        """Apply a provider status; with ``settle``, capture ``cost`` (or release on failed)."""
        return str(await self._scalar("job_provider_status", job_id, sid, status, cost,
                                      error_code, settle))

    async def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's row, or None."""
        row = await self._db.fetchrow(q("get_job"), job_id)
        return None if row is None else dict(row)

    async def unresolved(self, older_than: datetime, limit: int = 500) -> list[UnresolvedJob]:
        """Jobs stuck in ``sending`` or ``unknown`` since before ``older_than``."""
        rows = await self._db.fetch(q("unresolved_jobs"), older_than, limit)
        return [_unresolved(r) for r in rows]

    async def overdue(self, older_than: datetime, limit: int = 500) -> list[UnresolvedJob]:
        """Every unfinished, unheld job past ``older_than``: sending, unknown, retry_wait due."""
        rows = await self._db.fetch(q("overdue_jobs"), older_than, limit)
        return [_unresolved(r) for r in rows]

    async def _scalar(self, name: str, *args: Any) -> Any:
        row = await self._db.fetchrow(q(name), *args)
        return row[0]

    async def provider_status_many(self, reports: list[JobReport]) -> list[str]:
        """``provider_status`` for several reports in one round trip and one transaction.

        The job lookup is part of the statement: each cost is the reported units (else those
        reserved) times the job's rate; results come back in the given order.
        """
        rows = await self._db.fetch(
            q("jobs_provider_status"), [r.job_id for r in reports], [r.kind for r in reports],
            [r.sid for r in reports], [r.status for r in reports], [r.settle for r in reports],
            [r.units for r in reports], [r.error_code for r in reports])
        statuses = [""] * len(reports)
        for row in rows:
            statuses[row["i"] - 1] = str(row["status"])
        return statuses


@dataclass(frozen=True)
class JobReport:
    """A provider status report for one job, as ``provider_status_many`` takes it."""

    job_id: str
    kind: str
    sid: str | None
    status: str
    settle: bool
    units: int | None
    error_code: int | None


def _unresolved(r: Any) -> UnresolvedJob:
    return UnresolvedJob(r["job_id"], r["account_id"], r["kind"], r["status"], r["attempts"],
                         r["provider_sid"], r["reason"], json.loads(r["payload"]),
                         r["created_at"], r["updated_at"], r["sending_at"],
                         r.get("retry_at"))


def _json(payload: dict[str, Any] | str) -> str:
    return payload if isinstance(payload, str) else json.dumps(payload)
