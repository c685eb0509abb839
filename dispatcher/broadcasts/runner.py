"""Broadcasts: store one submission, then fan it out to per-recipient SMS jobs in batches.

Each batch is priced in Python and reserved in one round trip (``reserve_batch`` through
``begin_broadcast_batch``); what the balance cannot cover is held and the account pauses, so a
broadcast pauses and resumes with its account. Recipient job ids are ``<broadcast>:<seq>``,
which makes a re-run of a batch after a crash a no-op.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import structlog

from dispatcher.broadcasts.preflight import (
    AutoRecharge,
    Guards,
    PreflightResult,
    Recipients,
    gc_paused,
    preflight,
)
from dispatcher.broadcasts.timing import deferred_at, schedule_note
from dispatcher.credits.guards import load_guards
from dispatcher.credits.rates import RateCache
from dispatcher.credits.sending_settings import QuietHoursAccounts
from dispatcher.db import Connection
from dispatcher.errors import DispatcherError, JobIdConflict, UnknownAccount
from dispatcher.jobs.contract import BroadcastJob, job_fingerprint
from dispatcher.jobs.outcomes import Outcome
from dispatcher.pricing.numbers import default_resolver
from dispatcher.pricing.quiet_hours import zones_for
from dispatcher.pricing.quotes import count_segments
from dispatcher.pricing.templates import Template
from dispatcher.queries import q

log = structlog.get_logger(__name__)

# (payload, attempt, wanted): ``wanted()`` turns false once the send's broadcast is canceled.
SendReleased = Callable[[bytes, int, Callable[[], bool]], Awaitable[Outcome]]
OptedOut = Callable[[asyncpg.Pool, str, list[str]], Awaitable[set[str]]]
Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Progress:
    """Where a broadcast stands."""

    broadcast_id: str
    account: str
    status: str
    total: int
    skipped: int
    pending: int
    sending: int
    sent: int
    delivered: int
    failed: int
    held: int
    canceled: int
    credits_reserved: int
    credits_spent: int
    created_at: str
    finished_at: str | None
    # Scheduled: when it starts; deferred: recipients waiting for their quiet hours to end.
    send_at: str | None = None
    deferred: int = 0
    deferred_until: str | None = None

    def as_json(self) -> dict[str, object]:
        return dict(vars(self))


class BroadcastShort(DispatcherError):
    """The account cannot pay for this broadcast and auto-recharge is off."""

    code = "insufficient_credits"


@dataclass(frozen=True)
class BroadcastSpec:
    """What a broadcast sends, from whom, to whom."""

    account: str
    body: str
    footer: bool
    priority: str
    sender: str | None
    messaging_service_sid: str | None
    recipients: Recipients
    # The publisher's metadata, echoed in every recipient's status events.
    metadata: dict[str, str] = field(default_factory=dict)
    # No recipient is sent after this (issue 16): pending ones then end failed/expired.
    expires_at: datetime | None = None
    # Not before this time: stored `scheduled`, reserved and fanned out from then.
    send_at: datetime | None = None

    @classmethod
    def from_job(cls, job: BroadcastJob) -> BroadcastSpec:
        """The spec of an AMQP broadcast job (its validity already made absolute)."""
        return cls(job.account, job.body, job.footer, job.priority, job.from_,
                   job.messaging_service_sid,
                   Recipients.from_dicts([dict(r) for r in job.recipients]), dict(job.metadata),
                   job.expires_at, job.send_at)


async def account_opt_outs(pool: asyncpg.Pool, account: str, numbers: list[str]) -> set[str]:
    """The account's opted-out numbers among ``numbers``, in one query either way.

    Opt-out lists are usually far shorter than a broadcast: read the whole list then; look the
    numbers up by index only when the list is the longer one.
    """
    rows = await pool.fetch(q("broadcast_account_opt_outs"), account, len(numbers) + 1)
    if len(rows) <= len(numbers):
        return {row["number"] for row in rows}.intersection(numbers)
    return {row["number"] for row in await pool.fetch(q("api_opted_out_among"), account,
                                                        numbers)}


class Broadcasts:
    """Pre-flight and submission, shared by the HTTP API and AMQP broadcast jobs."""

    def __init__(self, pool: asyncpg.Pool, rates: RateCache,
                 opted_out: OptedOut = account_opt_outs,
                 wake: Callable[[], None] = lambda: None,
                 canceled: Callable[[str], None] = lambda _: None,
                 quiet_hours: QuietHoursAccounts | None = None,
                 clock: Clock = _utc_now) -> None:
        self.pool = pool
        self._quiet_hours = quiet_hours or QuietHoursAccounts(pool)
        self._clock = clock
        self._rates = rates
        self._opted_out = opted_out
        self.wake = wake
        self._canceled = canceled
        self._resolver = default_resolver()

    async def preflight(self, account: str, template: Template, recipients: Recipients,
                        send_at: datetime | None = None,
                        priority: str = "bulk") -> PreflightResult:
        """Price a broadcast without writing anything; with ``send_at``, say what today's
        balance covers, and for bulk, who the account's quiet hours would defer then."""
        result = await self._price(account, template, recipients)
        now = self._clock()
        at = send_at if send_at is not None and send_at > now else now
        changes: dict[str, Any] = {}
        if at > now:
            changes["schedule"] = schedule_note(result, at)
        window = await self._quiet_hours.window(account) if priority == "bulk" else None
        if window is not None:
            changes["quiet_hours"] = deferred_at(result, window, at)
        return dataclasses.replace(result, **changes) if changes else result

    async def _price(self, account: str, template: Template,
                     recipients: Recipients) -> PreflightResult:
        row = await self.pool.fetchrow(q("preflight_account"), account)
        if row is None:
            raise UnknownAccount(f"no account {account!r}", account_id=account)
        with gc_paused():  # canonical forms first: opt-outs are stored in canonical form
            countries, numbers = self._resolver.resolve_canonical(recipients.numbers)
        recipients = Recipients(numbers, recipients.variables)
        opted_out = await self._opted_out(self.pool, account, list(numbers))
        auto = AutoRecharge(row["auto_recharge_enabled"], row["auto_recharge_threshold"],
                            row["auto_recharge_amount"])
        rates = await self._rates.get()
        if row["smart_encoding"]:
            template = template.smart_encoded()
        guards = await load_guards(self.pool, account)
        allowed = guards.settings.allowed_countries
        seen = Guards(None if allowed is None else frozenset(allowed),
                      guards.settings.max_credits_per_message, guards.remaining_today())
        with gc_paused():
            return preflight(template, recipients, rates, opted_out, row["available"], auto,
                             self._resolver, countries, seen)

    def now(self) -> datetime:
        """What time it is for schedules and quiet hours (the service's clock)."""
        return self._clock()

    def scheduled(self, spec: BroadcastSpec) -> bool:
        """Whether this broadcast waits for its ``send_at`` (one in the past goes at once)."""
        return spec.send_at is not None and spec.send_at > self._clock()

    async def check(self, spec: BroadcastSpec, *, refuse_if_short: bool) -> PreflightResult:
        """The pre-flight of a submission; ``BroadcastShort`` if refused for lack of credits
        (never a scheduled one: it is reserved at its time, from the balance then)."""
        result = await self.preflight(spec.account, Template(spec.body, spec.footer),
                                      spec.recipients, spec.send_at, spec.priority)
        if refuse_if_short and not self.scheduled(spec) and result.advice in (
                "enable_auto_recharge", "top_up"):
            raise BroadcastShort(
                f"{result.shortfall} more credits are needed", shortfall=result.shortfall,
                advice=result.advice, preflight=result.as_json())
        return result

    async def submit(self, broadcast_id: str, job: BroadcastJob, *,
                     refuse_if_short: bool) -> tuple[PreflightResult, bool]:
        """Pre-flight, then store and start it; (result, False) for a replayed id.

        ``JobIdConflict`` when the id is already another broadcast's (another account or
        other content): the first one is left as it is.
        """
        spec = BroadcastSpec.from_job(job)
        fingerprint = job_fingerprint(job)
        result = await self.check(spec, refuse_if_short=refuse_if_short)
        async with self.pool.acquire() as conn, conn.transaction():
            stored = await store_broadcast(conn, broadcast_id, spec, result,
                                           fingerprint=fingerprint,
                                           scheduled=self.scheduled(spec))
            if not stored:
                first = await conn.fetchrow(q("broadcast_identity"), broadcast_id)
                if first is not None and (first["account_id"] != job.account or first[
                        "fingerprint"] not in (None, fingerprint)):
                    raise JobIdConflict(job_id=broadcast_id, account_id=job.account)
        if stored:
            self.wake()
        return result, stored

    async def cancel(self, broadcast_id: str) -> str:
        """Cancel in the database, then tell this process's runner; the status afterwards."""
        status = await cancel(self.pool, broadcast_id)
        if status == "canceled":
            self._canceled(broadcast_id)
        return status

    def notify_canceled(self, broadcast_id: str) -> None:
        """A cancel of this broadcast committed elsewhere (an AMQP cancel): stop its sends."""
        self._canceled(broadcast_id)


async def store_broadcast(conn: Connection, broadcast_id: str, spec: BroadcastSpec,
                          result: PreflightResult, *, fingerprint: str | None = None,
                          scheduled: bool = False) -> bool:
    """Write the broadcast and its recipients (COPY); False if that id already exists.

    ``fingerprint`` (``job_fingerprint``) lets a reused id with another broadcast be told apart.
    ``scheduled``: it waits, `scheduled`, for its ``send_at`` (the releaser starts it).
    """
    created = await conn.fetchval(
        q("broadcast_insert"), broadcast_id, spec.account, spec.priority, spec.sender,
        spec.messaging_service_sid, spec.body, spec.footer, result.recipients,
        result.recipients - result.billable, result.credits, json.dumps(spec.metadata),
        fingerprint, result.smart_encoding)
    if created is None:
        return False
    if spec.expires_at is not None:
        await conn.execute(q("broadcast_set_expiry"), broadcast_id, spec.expires_at)
    skips = result.skip_reasons
    encode = msgspec.json.encode
    rows = [(broadcast_id, i, to, encode(variables).decode(),
             "skipped" if i in skips else "pending", skips.get(i))
            for i, (to, variables) in enumerate(zip(result.numbers or spec.recipients.numbers,
                                                    spec.recipients.variables, strict=True))]
    await conn.copy_records_to_table(
        "broadcast_recipients", records=rows,
        columns=["broadcast_id", "seq", "to_number", "vars", "status", "skip_reason"])
    await conn.execute(q("broadcast_counts_insert"), broadcast_id,
                       sum(1 for row in rows if row[4] == "pending"))
    if skips:
        await conn.execute(q("broadcast_emit_skipped"), broadcast_id)
    if scheduled:
        await conn.execute(q("broadcast_schedule"), broadcast_id, spec.send_at)
    log.info("broadcast_stored", broadcast_id=broadcast_id, account_id=spec.account,
             recipients=result.recipients, billable=result.billable)
    return True


class BroadcastRunner:
    """Fans running broadcasts out, batch by batch, sending each reserved job once.

    Sends run as tasks in a bounded window: the next batch is reserved while the previous one
    is still being sent, but never more than ``window`` recipients are reserved and unsent, so
    a crash leaves at most that many for the reconciler.
    """

    def __init__(self, pool: asyncpg.Pool, rates: RateCache, send: SendReleased, *,
                 batch: int = 100, window: int = 150,
                 quiet_hours: QuietHoursAccounts | None = None,
                 clock: Clock = _utc_now) -> None:
        if window < batch:
            raise ValueError("the window must hold at least one batch")
        self._pool = pool
        self._quiet_hours = quiet_hours or QuietHoursAccounts(pool)
        self._clock = clock
        self._rates = rates
        self._send = send
        self._batch = batch
        self._slots = asyncio.Semaphore(window)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._resolver = default_resolver()
        self._wake = asyncio.Event()
        self._last_seq: dict[str, int] = {}  # per running broadcast: the last seq claimed
        self._sending: Counter[str] = Counter()  # per broadcast: its sends started, not done
        # Broadcasts with sends still waiting here that are known to be canceled: those give
        # their sender's turn up (the database cancel already ended them).
        self._stopped: set[str] = set()

    def wake(self) -> None:
        """A broadcast was submitted: look for work now."""
        self._wake.set()

    def canceled(self, broadcast_id: str) -> None:
        """A cancel of this broadcast committed: its waiting sends stop waiting."""
        if self._sending[broadcast_id]:
            self._stopped.add(broadcast_id)

    async def run(self, stop: asyncio.Event) -> None:
        """Work through running broadcasts until ``stop``; sleep until woken when idle."""
        try:
            while not stop.is_set():
                self._wake.clear()
                worked = False
                running = await self._pool.fetch(q("running_broadcasts"))
                self._last_seq = {r["id"]: self._last_seq[r["id"]] for r in running
                                  if r["id"] in self._last_seq}
                # Canceled here or by another replica: a broadcast with sends in flight that
                # is no longer running was canceled (one completes only once none is left).
                self._stopped.update(set(self._sending) - {r["id"] for r in running})
                for row in running:
                    worked |= await self.step(row)
                if not worked:
                    await self._idle(stop)
        finally:
            await self.drain(5.0)

    async def _idle(self, stop: asyncio.Event) -> None:
        """Wait for a submission or a stop; while sends are in flight, only until they end."""
        waiters: list[asyncio.Task[object]] = [asyncio.create_task(self._wake.wait()),
                                               asyncio.create_task(stop.wait())]
        timeout = 5.0
        if self._in_flight:
            waiters.append(asyncio.create_task(self.drain(1.0)))
            timeout = 1.0
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()

    async def drain(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the sends in flight."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=seconds)

    async def step(self, broadcast: asyncpg.Record) -> bool:
        """Reserve one batch of a broadcast and start sending it; False when none was pending."""
        expires_at = broadcast["expires_at"]
        if expires_at is not None and expires_at <= datetime.now(UTC):
            # Nothing more goes out: the expiry sweep ends the pending recipients.
            await self._pool.fetchval(q("broadcast_finish_if_done"), broadcast["id"])
            return False
        pending = await self._pending(broadcast["id"])
        if not pending:
            await self._pool.fetchval(q("broadcast_finish_if_done"), broadcast["id"])
            return False
        for _ in pending:
            await self._slots.acquire()
        to_send: list[str] = []
        args: list[Any] = []
        now_args: list[Any] = [[]]
        try:
            args = await self._batch_args(broadcast, pending)
            now_args = await self._defer_quiet(broadcast, args)
            to_send = [r["job_id"] for r in await self._pool.fetch(
                q("begin_broadcast_batch"), broadcast["id"], *now_args)] if now_args[0] else []
            self._last_seq[broadcast["id"]] = pending[-1]["seq"]
        finally:
            for _ in range(len(pending) - len(to_send)):  # held, canceled or failed: no send
                self._slots.release()
        payloads = dict(zip(args[1], args[2], strict=True))
        for job_id in to_send:
            self._sending[broadcast["id"]] += 1
            task = asyncio.create_task(self._send_one(broadcast["id"], payloads[job_id]),
                                       name="broadcast-send")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return bool(to_send) or len(now_args[0]) < len(args[0])

    async def _defer_quiet(self, b: asyncpg.Record, args: list[Any]) -> list[Any]:
        """Store the batch's recipients inside the account's quiet hours as `deferred` (a bulk
        broadcast only); the rest of the batch, to reserve now."""
        window = await self._quiet_hours.window(b["account_id"]) if b[
            "priority"] == "bulk" else None
        if window is None:
            return args
        now = self._clock()
        zones = [zones_for(json.loads(payload)["to"]) for payload in args[2]]
        ends = {z: window.quiet_until(z, now) for z in set(zones)}
        untils = [ends[z] for z in zones]
        later = [i for i, until in enumerate(untils) if until is not None]
        if not later:
            return args
        await self._pool.fetch(q("defer_broadcast_batch"), b["id"],
                               *[[column[i] for i in later] for column in args],
                               [untils[i] for i in later])
        log.info("broadcast_recipients_deferred", broadcast_id=b["id"], deferred=len(later))
        keep = [i for i, until in enumerate(untils) if until is None]
        return [[column[i] for i in keep] for column in args]

    async def _pending(self, broadcast_id: str) -> list[asyncpg.Record]:
        """The next batch of pending recipients, after the last one this runner claimed.

        Only a batch that failed before its claim (here or in another process) leaves
        recipients pending behind that seq: look from the start before calling it done.
        """
        last = self._last_seq.get(broadcast_id, -1)
        pending: list[asyncpg.Record] = await self._pool.fetch(
            q("broadcast_pending_batch"), broadcast_id, last, self._batch)
        if not pending and last >= 0:
            pending = await self._pool.fetch(q("broadcast_pending_batch"), broadcast_id, -1,
                                             self._batch)
        return pending

    async def _send_one(self, broadcast_id: str, payload: str) -> None:
        try:
            await self._send(payload.encode(), 1, lambda: broadcast_id not in self._stopped)
        except Exception:
            # The job stays 'sending' with its credits reserved; the reconciler resolves it.
            log.exception("broadcast_send_failed")
        finally:
            self._slots.release()
            self._sending[broadcast_id] -= 1
            if not self._sending[broadcast_id]:
                del self._sending[broadcast_id]
                self._stopped.discard(broadcast_id)

    async def _batch_args(self, b: asyncpg.Record,
                          pending: Sequence[asyncpg.Record]) -> list[Any]:
        rates = await self._rates.get()
        # The text priced at submission is the text sent: Smart-Encoded if it was then.
        template = Template(b["body"], b["footer"], smart_encoding=b["smart_encoding"])
        created_at = max(b["created_at"], b.get("send_at") or b["created_at"]).isoformat()
        metadata = json.loads(b["metadata"])
        seqs, ids, payloads, estimates, countries, units, unit_rates = [], [], [], [], [], [], []
        for r in pending:
            country = self._resolver.resolve(r["to_number"]) or "*"
            text = template.render(json.loads(r["vars"]))
            segments = count_segments(text).segments
            rate = rates.rate("sms", country)
            job_id = f"{b['id']}:{r['seq']}"
            # created_at: the submission's (a scheduled one's send_at), so end-to-end latency
            # counts the fan-out's wait.
            payload: dict[str, Any] = {
                "schema_version": 1, "id": job_id, "kind": "sms", "account": b["account_id"],
                "to": r["to_number"], "body": text, "priority": b["priority"],
                "metadata": metadata, "created_at": created_at}
            if b["expires_at"] is not None:
                payload["expires_at"] = b["expires_at"].astimezone(UTC).isoformat()
            if b["messaging_service_sid"]:
                payload["messaging_service_sid"] = b["messaging_service_sid"]
            else:
                payload["from"] = b["sender"]
            seqs.append(r["seq"])
            ids.append(job_id)
            payloads.append(json.dumps(payload))
            estimates.append(max(segments * rate, 1))
            countries.append(country)
            units.append(segments)
            unit_rates.append(rate)
        return [seqs, ids, payloads, estimates, countries, units, unit_rates]


async def progress(pool: asyncpg.Pool, broadcast_id: str) -> Progress | None:
    """Counts by state, or None for an unknown broadcast."""
    b = await pool.fetchrow(q("broadcast_get"), broadcast_id)
    if b is None:
        return None
    p = await pool.fetchrow(q("broadcast_progress"), broadcast_id)
    assert p is not None
    waiting = await pool.fetchrow(q("broadcast_deferred"), broadcast_id)
    assert waiting is not None
    finished = b["finished_at"]
    send_at = await pool.fetchval(q("broadcast_send_at"), broadcast_id)
    return Progress(broadcast_id, b["account_id"], b["status"], b["total"], b["skipped"],
                    p["pending"], p["sending"], p["sent"], p["delivered"], p["failed"],
                    p["held"], p["canceled"], p["credits_reserved"], p["credits_spent"],
                    b["created_at"].isoformat(),
                    finished.isoformat() if finished is not None else None,
                    _iso(send_at), waiting["deferred"], _iso(waiting["deferred_until"]))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


async def cancel(pool: asyncpg.Pool, broadcast_id: str) -> str:
    """Stop unsent recipients; returns the broadcast's status afterwards."""
    return str(await pool.fetchval(q("cancel_broadcast_anytime"), broadcast_id))
