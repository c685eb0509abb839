"""One job as its owner sees it: state, history, credits and — while it waits — why.

The one read behind ``GET /v1/accounts/{account}/jobs/{job_id}`` and ``dispatcher jobs show``:
the job row, its status events (the outbox keeps every one), its reservation and ledger rows,
and its account's credit state, read in one read-only snapshot.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, Field

from dispatcher.db import Connection
from dispatcher.queries import q

WAITING = frozenset({"scheduled", "deferred", "queued", "held", "sending", "retry_wait",
                     "unknown"})
NEVER_SENT = frozenset({"failed", "expired", "canceled"})
WhyCode = Literal["insufficient_credits", "scheduled", "quiet_hours", "fair_share",
                  "retry_wait", "provider_rate_limited", "sending", "provider_outcome_unknown",
                  "expired", "not_sent", "broadcast_pending"]


class _Out(BaseModel):
    """Answer bodies: every field always present."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


class JobHistoryEntry(_Out):
    """One step of the job: `received`, then its status events (and where it is now)."""

    status: str
    at: datetime
    reason: str | None = None
    credits: int | None = Field(default=None,
                                description="the event's credits: reserved, then charged")


class JobLedgerLine(_Out):
    """A ledger row of the job: its reservation (`reserve`), its settlement (`capture` or
    `release`)."""

    kind: str
    reference: str
    amount: int
    at: datetime


class JobReservation(_Out):
    """The job's reservation: `pending` while held for it, then `captured` or `released`."""

    amount: int
    status: Literal["pending", "captured", "released"]
    captured: int | None
    reserved_at: datetime
    settled_at: datetime | None


class JobCredits(_Out):
    """What the job costs: the estimate, the reservation and the final charge."""

    estimate: int
    reservation: JobReservation | None
    final_cost: int | None = Field(
        description="charged once settled (0 when nothing was charged); null until then")
    ledger: list[JobLedgerLine]


class JobTopUp(_Out):
    """The account's top-up state: `requested` while a balance.low episode is open (billing
    asked to top up, credits not arrived yet)."""

    requested: bool
    episode: int
    auto_recharge_enabled: bool
    auto_recharge_amount: int
    topup_at_zero: bool


class JobHeld(_Out):
    """Why a held job waits: what the account has and what releasing the job needs."""

    available: int
    credits_needed: int = Field(description="credits to release it: its own and those of the "
                                            "held jobs ahead of it")
    held_ahead: int
    paused_since: datetime | None
    top_up: JobTopUp


class JobWhy(_Out):
    """Why the job has not gone (yet): `code`, words, and until when if known."""

    code: WhyCode
    message: str
    until: datetime | None = Field(description="when it moves on by itself, if known")
    ends_by: datetime | None = Field(
        description="when it ends failed if still waiting: its expires_at, or for a held job "
                    "the hold limit, whichever is first")
    held: JobHeld | None


class JobView(_Out):
    """A job's state, history, credits and, while it waits or if it never went, why."""

    job_id: str
    account: str
    kind: str
    priority: str
    broadcast_id: str | None
    status: str
    reason: str | None
    final: bool
    attempts: int
    provider_sid: str | None
    created_at: datetime
    updated_at: datetime
    not_before: datetime | None
    expires_at: datetime | None
    why: JobWhy | None
    credits: JobCredits
    history: list[JobHistoryEntry]


class JobViews:
    """Reads job views; ``hold_expiry_seconds`` is the service's hold limit (72 h)."""

    def __init__(self, pool: asyncpg.Pool, hold_expiry_seconds: float = 72 * 3600.0) -> None:
        self._pool = pool
        self._hold_limit = timedelta(seconds=hold_expiry_seconds)

    async def get(self, job_id: str, account: str | None = None) -> JobView | None:
        """The job (only if it is ``account``'s, when given), or None."""
        async with self._pool.acquire() as conn, conn.transaction(
                isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(q("job_view"), job_id, account)
            if row is None:
                staged = await conn.fetchrow(q("job_view_staged"), job_id, account)
                if staged is not None:
                    return _staged(staged)
                return await _recipient(conn, job_id, account)
            reservation = await conn.fetchrow(q("job_view_reservation"), job_id)
            ledger = await conn.fetch(q("job_view_ledger"), job_id)
            events = await conn.fetch(q("job_view_events"), job_id)
        return JobView(
            job_id=row["job_id"], account=row["account_id"], kind=row["kind"],
            priority=row["priority"], broadcast_id=row["broadcast_id"], status=row["status"],
            reason=row["reason"], final=row["status"] not in WAITING | {"sent"},
            attempts=row["attempts"], provider_sid=row["provider_sid"],
            created_at=row["created_at"], updated_at=row["updated_at"],
            not_before=row["not_before"], expires_at=row["expires_at"],
            why=self._why(row), credits=_credits(row, reservation, ledger),
            history=_history(row, events))

    def _why(self, row: Any) -> JobWhy | None:
        status, reason = row["status"], row["reason"]
        if status not in WAITING and status not in NEVER_SENT:
            return None
        ends_by = row["expires_at"]
        until, held = None, None
        code: WhyCode
        if status == "held":
            limit = row["created_at"] + self._hold_limit
            ends_by = limit if ends_by is None else min(ends_by, limit)
            held = _held(row)
            code, message = "insufficient_credits", (
                f"held: the account has {held.available} credits available and needs "
                f"{held.credits_needed} to release it ({held.held_ahead} held jobs ahead); "
                + _top_up_words(held))
        elif status in ("scheduled", "deferred"):
            until = row["not_before"]
            code, message = (("scheduled", "scheduled: released at its send time")
                             if status == "scheduled" else
                             ("quiet_hours", "deferred: the recipient's quiet hours; released "
                                             "when they end"))
        elif status == "queued":
            code, message = "fair_share", "queued: waiting for its account's fair turn"
        elif status == "retry_wait":
            until = row["retry_at"]
            code = "provider_rate_limited" if reason == "provider_rate_limited" else "retry_wait"
            message = (f"retry_wait: the provider refused it for now ({reason}); sent again "
                       "when due")
        elif status == "sending":
            code, message = "sending", ("sending: credits reserved; waiting for its sender's "
                                        "rate-limit turn or a provider slot, or being sent")
        elif status == "unknown":
            code, message = "provider_outcome_unknown", (
                f"unknown: the provider's answer was lost ({reason}); credits stay reserved "
                "until the status callback or reconciliation settles it")
        elif reason == "expired":
            return JobWhy(code="expired", message="expired: its expires_at passed before it "
                          "could be sent; nothing was charged", until=None,
                          ends_by=row["expires_at"], held=None)
        else:
            return JobWhy(code="not_sent", message=f"{status}: {reason}", until=None,
                          ends_by=None, held=None)
        return JobWhy(code=code, message=message, until=until, ends_by=ends_by, held=held)


def _staged(row: Any) -> JobView:
    """A job staged in PostgreSQL behind its account's backlog: ``queued`` for its fair turn
    (it becomes a job row, reserved or held, when its turn comes)."""
    received = row["sent_at"] or row["staged_at"]
    return JobView(
        job_id=row["job_id"], account=row["account_id"], kind=row["kind"] or "sms",
        priority="transactional" if row["lane"] == 0 else "bulk", broadcast_id=None,
        status="queued", reason="fair_share", final=False, attempts=0, provider_sid=None,
        created_at=received, updated_at=row["staged_at"], not_before=None, expires_at=None,
        why=JobWhy(code="fair_share", message="queued: its account has a backlog; it waits "
                   "for the account's fair turn (nothing reserved yet)", until=None,
                   ends_by=None, held=None),
        credits=JobCredits(estimate=0, reservation=None, final_cost=None, ledger=[]),
        history=[JobHistoryEntry(status="received", at=received),
                 JobHistoryEntry(status="queued", at=row["staged_at"], reason="fair_share")])


async def _recipient(conn: Connection, job_id: str,
                     account: str | None) -> JobView | None:
    """A broadcast recipient that never became a job row: pending, skipped or canceled."""
    broadcast_id, _, seq = job_id.rpartition(":")
    if not broadcast_id or not seq.isdigit() or len(seq) > 9:
        return None
    row = await conn.fetchrow(q("job_view_recipient"), broadcast_id, int(seq), account)
    if row is None:
        return None
    events = await conn.fetch(q("job_view_events"), job_id)
    pending = row["status"] == "pending"
    reason = row["skip_reason"] if row["status"] == "skipped" else (
        "broadcast_canceled" if row["status"] == "canceled" else None)
    why = JobWhy(code="broadcast_pending", message="pending: its broadcast has not reached it "
                 "yet (recipients are fanned out in order, in batches)", until=None,
                 ends_by=row["expires_at"], held=None) if pending else JobWhy(
        code="not_sent", message=f"{row['status']}: {reason}", until=None, ends_by=None,
        held=None)
    history = [JobHistoryEntry(status="received", at=row["created_at"])] + [
        JobHistoryEntry(status=e["status"], at=e["created_at"], reason=e["reason"],
                        credits=e["credits"]) for e in events]
    return JobView(
        job_id=job_id, account=row["account_id"], kind="sms", priority=row["priority"],
        broadcast_id=broadcast_id, status=row["status"], reason=reason, final=not pending,
        attempts=0, provider_sid=None, created_at=row["created_at"],
        updated_at=history[-1].at, not_before=None, expires_at=row["expires_at"], why=why,
        credits=JobCredits(estimate=0, reservation=None, final_cost=None if pending else 0,
                           ledger=[]),
        history=history)


def _top_up_words(held: JobHeld) -> str:
    if held.top_up.requested:
        return (f"a top-up was requested (balance.low, episode {held.top_up.episode}) and has "
                "not arrived yet")
    if held.paused_since is not None:
        return "billing was told the balance is depleted (balance.depleted); no credits yet"
    return "no top-up is in flight: add credits"


def _held(row: Any) -> JobHeld:
    return JobHeld(
        available=row["available"], credits_needed=row["credits_needed"] or row["estimate"],
        held_ahead=row["held_ahead"] or 0, paused_since=row["paused_at"],
        top_up=JobTopUp(requested=row["low_balance_open"], episode=row["low_balance_episode"],
                        auto_recharge_enabled=row["auto_recharge_enabled"],
                        auto_recharge_amount=row["auto_recharge_amount"],
                        topup_at_zero=row["topup_at_zero"]))


def _credits(row: Any, reservation: Any, ledger: list[Any]) -> JobCredits:
    held_for = None if reservation is None else JobReservation(
        amount=reservation["amount"], status=reservation["status"],
        captured=reservation["captured"], reserved_at=reservation["created_at"],
        settled_at=reservation["settled_at"])
    return JobCredits(estimate=row["estimate"], reservation=held_for,
                      final_cost=row["final_cost"],
                      ledger=[JobLedgerLine(kind=r["kind"], reference=r["reference"],
                                         amount=r["amount"], at=r["created_at"])
                              for r in ledger])


def _history(row: Any, events: list[Any]) -> list[JobHistoryEntry]:
    """`received`, each status event, and the current state when it has no event of its own
    (sending, retry_wait), in time order."""
    steps = [JobHistoryEntry(status="received", at=row["created_at"])]
    steps += [JobHistoryEntry(status=e["status"], at=e["created_at"], reason=e["reason"],
                           credits=e["credits"]) for e in events]
    # The latest send began (no event marks it; a held row carries a stale sending_at but no
    # attempt).
    if row["sending_at"] is not None and row["attempts"] > 0:
        steps.append(JobHistoryEntry(status="sending", at=row["sending_at"]))
    if row["status"] not in {step.status for step in steps[1:]}:
        steps.append(JobHistoryEntry(status=row["status"], at=row["updated_at"],
                                  reason=row["reason"]))
    return sorted(steps, key=lambda step: step.at)


def describe(view: JobView) -> str:
    """The view as an operator reads it (``dispatcher jobs show``; ``--json`` for all of it)."""
    lines = [f"job {view.job_id}  account {view.account}  {view.kind} {view.priority}"
             + (f"  broadcast {view.broadcast_id}" if view.broadcast_id else ""),
             f"status: {view.status}" + (f" ({view.reason})" if view.reason else "")
             + ("" if view.final else "  [not final]")]
    if view.why is not None:
        lines.append(f"why: {view.why.code}: {view.why.message}")
        for label, moment in (("until", view.why.until), ("ends by", view.why.ends_by)):
            if moment is not None:
                lines.append(f"  {label}: {moment.isoformat()}")
    held_for = view.credits.reservation
    lines.append(f"credits: estimate {view.credits.estimate}, reservation "
                 + ("-" if held_for is None else f"{held_for.amount} {held_for.status}")
                 + ", final cost "
                 + ("-" if view.credits.final_cost is None else str(view.credits.final_cost)))
    lines.append("history:")
    lines += [f"  {step.at.isoformat()}  {step.status}"
              + (f"  {step.reason}" if step.reason else "") for step in view.history]
    return "\n".join(lines)
