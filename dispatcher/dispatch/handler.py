"""Handle one job: validate, price, begin (reserve or hold), send once, record the outcome.

Knows nothing of AMQP: it returns an ``Outcome`` and the consumer acks, retries or dead-letters.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from dispatcher.broadcasts.runner import Broadcasts
from dispatcher.credits.rates import RateCache
from dispatcher.credits.sending_settings import QuietHoursAccounts, SmartEncodingAccounts
from dispatcher.dispatch.ordering import AccountTurns
from dispatcher.dispatch.ratelimit import SenderLimiter
from dispatcher.dispatch.send_slots import SendSlots
from dispatcher.errors import DispatcherError, JobIdConflict
from dispatcher.events.topology import RETRY_DELAYS_SECONDS
from dispatcher.jobs.contract import (
    ROUTING_MISMATCH,
    Arrival,
    BroadcastJob,
    CallJob,
    CancelJob,
    InvalidJob,
    SmsJob,
    decode_stored_job,
    encode_job,
    parse_job,
    routing_mismatch,
    schedule_too_far,
    with_expiry,
)
from dispatcher.jobs.group_commit import GroupCommit
from dispatcher.jobs.outcomes import DeadLetter, Done, Outcome, RetryLater
from dispatcher.jobs.store import Begin, JobStore, NewJob
from dispatcher.metrics import Metrics
from dispatcher.pricing.quiet_hours import zones_for
from dispatcher.pricing.quotes import call_quote, sms_quote
from dispatcher.pricing.smart_encoding import smart_encode
from dispatcher.twilio.sender import Accepted, CallRequest, Sender, SendResult, SmsRequest

log = structlog.get_logger(__name__)

MAX_SEND_ATTEMPTS = 6
# A consumed job's retry normally comes back as its retry-queue message; its due time is later
# by this much, so the retry sweeper only sends it if that message was lost.
QUEUED_RETRY_BACKSTOP_SECONDS = 60.0
# Twilio's ValidityPeriod range (Messages create): a longer validity is not passed (Twilio's
# own default, 36000 s, then applies); a job with less than a second left is not sent.
VALIDITY_PERIOD_RANGE = (1, 36000)


def utc_now() -> datetime:
    """The handler's default clock."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class HandlerConfig:
    """What the handler needs from the settings."""

    callback_base_url: str
    max_job_bytes: int = 256 * 1024
    # Provider calls in flight at once (see send_slots).
    max_in_flight: int = 200
    # A job that waited longer than this for a provider slot re-claims itself before sending:
    # past the reconciler's grace, a `sending` job looks crashed and is taken over (a quarter
    # of the grace leaves the provider call itself the rest of it).
    reclaim_after_seconds: float = 15.0
    # Begins and acceptances of concurrent jobs share round trips (see group_commit).
    max_batch: int = 200
    batch_concurrency: int = 2


class JobHandler:
    """Turns one raw job into exactly one provider call at most, and its outcome."""

    def __init__(self, jobs: JobStore, sender: Sender, rates: RateCache,
                 limiter: SenderLimiter, metrics: Metrics, config: HandlerConfig,
                 broadcasts: Broadcasts | None = None,
                 smart_encoding: SmartEncodingAccounts | None = None,
                 quiet_hours: QuietHoursAccounts | None = None,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self._clock = clock  # decides expiry (expires_at) and the ValidityPeriod passed on
        self._broadcasts = broadcasts
        self._quiet_hours = quiet_hours
        self._smart_encoding = smart_encoding
        self._turns = AccountTurns()
        self._jobs = jobs
        self._sender = sender
        self._rates = rates
        self._limiter = limiter
        self._metrics = metrics
        self._config = config
        self._slots = SendSlots(config.max_in_flight)
        # Keyed by account: an account's jobs begin in the order they were queued, even when
        # they go in different batches.
        self._begins: GroupCommit[NewJob, Begin] = GroupCommit(
            self._begin_batch, jobs.begin, max_batch=config.max_batch,
            concurrency=config.batch_concurrency, key=lambda job: job.account_id,
            rank=lambda job: _rank(job.priority))
        self._accepts: GroupCommit[tuple[str, str, int], str] = GroupCommit(
            self._accepted_batch, lambda accepted: jobs.accepted(accepted[0], accepted[1]),
            max_batch=config.max_batch, concurrency=config.batch_concurrency,
            rank=lambda accepted: accepted[2])
        self._working: set[str] = set()  # reserved jobs being sent by send_released

    @property
    def round_trips(self) -> dict[str, int]:
        """Group-commit round trips so far, by kind (for the shutdown log)."""
        return {"begins": self._begins.batches, "accepts": self._accepts.batches}

    async def _begin_batch(self, batch: list[NewJob]) -> list[Begin]:
        # Account rows are locked in account order (arrival order within an account), so
        # concurrent batches cannot deadlock on them.
        order = sorted(range(len(batch)), key=lambda i: batch[i].account_id)
        begun = await self._jobs.begin_many([batch[i] for i in order])
        results: list[Begin] = [begun[0]] * len(batch)
        for position, i in enumerate(order):
            results[i] = begun[position]
        return results

    async def _accepted_batch(self, batch: list[tuple[str, str, int]]) -> list[str]:
        order = sorted(range(len(batch)), key=lambda i: batch[i][0])
        statuses = await self._jobs.accepted_many([batch[i][:2] for i in order])
        results = [""] * len(batch)
        for position, i in enumerate(order):
            results[i] = statuses[position]
        return results

    async def handle(self, raw: bytes, arrival: Arrival | None = None) -> Outcome:
        """Validate, begin and send one job (``arrival``: how it came, see ``routing_mismatch``);
        a refused job readable enough gets its event."""
        outcome = await self._handle(raw, arrival)
        if (isinstance(outcome, DeadLetter) and outcome.job_id and outcome.account_id
                and outcome.kind):
            # Written before the consumer parks the message: a failed park redelivers the job
            # and it is refused again, so the event is at least once, like every other.
            await self._jobs.dead_lettered(outcome.job_id, outcome.account_id, outcome.kind,
                                           outcome.reason, outcome.metadata)
        return outcome

    async def _handle(self, raw: bytes, arrival: Arrival | None) -> Outcome:
        try:
            job = parse_job(raw, max_bytes=self._config.max_job_bytes)
        except InvalidJob as exc:
            return DeadLetter(exc.reason, exc.detail, exc.job_id, exc.account, _sniff_kind(raw))
        mismatch = routing_mismatch(job, arrival) if arrival is not None else None
        if mismatch is not None:
            return _refused(ROUTING_MISMATCH, mismatch, job)
        if isinstance(job, CancelJob):
            return await self._cancel(job)
        job = with_expiry(job, self._clock())
        too_far = schedule_too_far(job.send_at, self._clock())
        if too_far is not None:
            return _refused("schedule_too_far", too_far, job)
        if isinstance(job, BroadcastJob):
            return await self._broadcast(job)
        async with self._turns.turn(job.account):
            try:
                job, new_job = await self._price(job)
            except DispatcherError as exc:
                return _refused(exc.code, str(exc), job)
            left = _seconds_left(job, self._clock())
            if left is not None and left < VALIDITY_PERIOD_RANGE[0]:
                # Received after its expires_at: recorded failed/expired, never reserved.
                return self._begun(job, await self._jobs.begin_expired(new_job))
            wait = await self._wait_for(job)
            if wait is not None:
                # Stored to wait for its time (scheduled, or deferred by quiet hours): nothing
                # reserved; the releaser reserves and sends it then (dispatch.releaser).
                return self._waited(job, await self._jobs.wait(new_job, *wait))
            # The sender's turn comes before the job becomes `sending`: a wait in `sending`
            # longer than the reconciler's grace would look like a crash and be resent.
            await self._limiter.acquire(_sender_of(job))
            reserving = time.perf_counter()
            # Queued in arrival order: the turn can go to the account's next job now, and the
            # group commit keeps the order (see ``_begins``), so one account is not limited to
            # one job per round trip.
            begun = self._begins.enqueue(new_job)
        begin = await begun
        self._metrics.reservation_seconds.observe(time.perf_counter() - reserving)
        if begin.outcome != "send":
            return self._begun(job, begin)
        return await self._send(job, begin.attempts, claim=False, queued=True)

    def _begun(self, job: SmsJob | CallJob, begin: Begin) -> Outcome:
        """The outcome of a begin that sends nothing now."""
        bound = log.bind(job_id=job.id, account_id=job.account, kind=job.kind)
        if begin.outcome == "unknown_account":
            return _refused("unknown_account", f"no account {job.account!r}", job)
        if begin.outcome == "conflict":  # the first job is left as it is
            bound.warning("job_id_conflict")
            return _refused("job_id_conflict", JobIdConflict.__doc__ or "", job)
        if begin.outcome in ("country_not_allowed", "price_above_limit"):
            bound.warning("job_refused_by_guard", reason=begin.outcome)
            return _refused(begin.outcome, _GUARD_REFUSALS[begin.outcome], job)
        if begin.outcome == "expired":  # received after its expires_at: never reserved
            return self._expired(bound, job, "on_arrival")
        bound.info("job_" + begin.outcome, status=begin.status)
        self._metrics.jobs.labels(kind=job.kind, outcome=begin.outcome).inc()
        return Done(begin.outcome)

    def _expired(self, bound: structlog.typing.FilteringBoundLogger, job: SmsJob | CallJob,
                 where: str) -> Outcome:
        bound.info("job_expired", where=where)
        self._metrics.jobs.labels(kind=job.kind, outcome="expired").inc()
        return Done("expired")

    async def _wait_for(self, job: SmsJob | CallJob) -> tuple[str, datetime, str] | None:
        """(status, not before, reason) of a job that may not go now: its ``send_at`` is
        ahead, or it is bulk and its recipient's local time is inside the account's quiet
        hours (at send time: a scheduled job whose time falls in them goes when they end)."""
        now = self._clock()
        wait: tuple[str, datetime, str] | None = None
        at = now
        if job.send_at is not None and job.send_at > now:
            at = job.send_at
            wait = ("scheduled", job.send_at, "send_at")
        if job.priority == "bulk" and self._quiet_hours is not None:
            window = await self._quiet_hours.window(job.account)
            until = None if window is None else window.quiet_until(zones_for(job.to), at)
            if until is not None:
                return (wait[0] if wait else "deferred", until,
                        wait[2] if wait else "quiet_hours")
        return wait

    def _waited(self, job: SmsJob | CallJob, begin: Begin) -> Outcome:
        bound = log.bind(job_id=job.id, account_id=job.account, kind=job.kind)
        if begin.outcome == "unknown_account":
            return _refused("unknown_account", f"no account {job.account!r}", job)
        if begin.outcome == "conflict":
            bound.warning("job_id_conflict")
            return _refused("job_id_conflict", JobIdConflict.__doc__ or "", job)
        outcome = "duplicate" if begin.outcome == "duplicate" else str(begin.status)
        bound.info("job_" + outcome, status=begin.status)
        self._metrics.jobs.labels(kind=job.kind, outcome=outcome).inc()
        return Done(outcome)

    async def _cancel(self, job: CancelJob) -> Outcome:
        """An AMQP cancel: once per id; ends a waiting job or a broadcast of its account."""
        outcome = await self._jobs.cancel_request(job.id, job.account, job.target)
        if outcome == "unknown_account":
            return _refused("unknown_account", f"no account {job.account!r}", job)
        if outcome == "conflict":
            return _refused("job_id_conflict", JobIdConflict.__doc__ or "", job)
        if outcome == "canceled" and self._broadcasts is not None:
            self._broadcasts.notify_canceled(job.target)
        log.info("cancel_request", job_id=job.id, account_id=job.account, outcome=outcome)
        if outcome == "canceled":
            self._metrics.jobs.labels(kind="cancel", outcome="canceled").inc()
        return Done("cancel_" + outcome)

    async def _broadcast(self, job: BroadcastJob) -> Outcome:
        if self._broadcasts is None:
            return _refused("unknown_kind", "this dispatcher does not run broadcasts", job)
        try:
            # Over AMQP nobody waits for an answer: a broadcast the account cannot pay for
            # yet is accepted and held, like single jobs, until credits arrive.
            await self._broadcasts.submit(job.id, job, refuse_if_short=False)
        except DispatcherError as exc:
            return _refused(exc.code, str(exc), job)
        return Done("broadcast_accepted")

    async def send_released(self, payload: bytes, attempt: int,
                            wanted: Callable[[], bool] = lambda: True) -> Outcome:
        """Send an already reserved ``sending`` job: released from hold, a broadcast recipient,
        or a retry that came due. Nobody retries its outcome: a retry is left to the sweeper.

        ``wanted()`` false while it waits for its sender's turn: its broadcast was canceled
        (the cancel, in the database, already ended the job), so it gives the turn up.
        """
        job = decode_stored_job(payload)
        self._working.add(job.id)
        try:
            if not await self._limiter.acquire(_sender_of(job), wanted):
                log.info("job_canceled_before_send", job_id=job.id, account_id=job.account,
                         kind=job.kind)
                return Done("canceled")
            return await self._send(job, attempt, claim=True)
        finally:
            self._working.discard(job.id)

    def working_on(self, job_id: str) -> bool:
        """True while this handler is sending (or waiting to send) an already reserved job."""
        return job_id in self._working

    async def _price(self, job: SmsJob | CallJob) -> tuple[SmsJob | CallJob, NewJob]:
        """The job as it will be sent (Smart-Encoded if the account says so) and its row."""
        rates = await self._rates.get()
        if isinstance(job, SmsJob):
            if self._smart_encoding is not None and await self._smart_encoding.enabled(
                    job.account):
                # Priced, stored and sent as encoded: the text priced is the text sent.
                job = job.model_copy(update={"body": smart_encode(job.body)})
            quote = sms_quote(job.to, job.body, rates)
            units = quote.segments
        else:
            quote = call_quote(job.to, job.max_minutes, rates)
            units = job.max_minutes
        return job, NewJob(job.id, job.account, job.kind, job.priority,
                           encode_job(job).decode(), max(quote.credits, 1), quote.country,
                           units, quote.rate)

    async def _send(self, job: SmsJob | CallJob, attempt: int, *, claim: bool,
                    queued: bool = False) -> Outcome:
        """Send once, in a provider slot. With ``claim`` (an already reserved job, or one that
        waited long for its slot) the job is claimed in the database right before the call:
        the last check, after every wait, that it is still ours and its broadcast still on.

        ``queued``: the job came from a work queue, whose retry queue brings it back after a
        refusal; otherwise the retry sweeper alone does (see ``dispatch.retries``).
        """
        bound = log.bind(job_id=job.id, account_id=job.account, kind=job.kind)
        callback = f"{self._config.callback_base_url}/twilio/status/{job.id}"
        recipient = False
        async with self._slots.slot(_rank(job.priority)) as waited:
            self._metrics.send_slot_wait_seconds.observe(waited)
            if claim or waited > self._config.reclaim_after_seconds:
                claimed = await self._jobs.claim_for_send(job.id, attempt)
                if claimed.status == "expired":  # the claim ended it, credits released
                    return self._expired(bound, job, "at_claim")
                if not claimed.claimed:
                    return _not_claimed(bound, claimed.status, waited)
                recipient = claimed.broadcast_id is not None
            left = _seconds_left(job, self._clock())
            if left is not None and left < VALIDITY_PERIOD_RANGE[0]:
                # Its time ran out while it waited for its turn or a slot: never sent.
                await self._jobs.not_sent(job.id, "expired")
                return self._expired(bound, job, "before_send")
            started = time.perf_counter()
            result = await self._call_provider(job, callback, left)
            self._metrics.send_seconds.labels(kind=job.kind).observe(
                time.perf_counter() - started)
        if isinstance(result, Accepted):
            accepted = time.perf_counter()
            await self._accepts.submit((job.id, result.sid, _rank(job.priority)))
            self._metrics.record_seconds.observe(time.perf_counter() - accepted)
            bound.info("job_sent", attempt=attempt)
            self._metrics.jobs.labels(kind=job.kind, outcome="sent").inc()
            if job.created_at is not None:
                # A broadcast's recipients count from the submission, a whole fan-out long:
                # kept apart from the sms latency. A scheduled job counts from its send_at.
                kind = "broadcast" if recipient else job.kind
                since = max(job.created_at, job.send_at or job.created_at)
                self._metrics.end_to_end_seconds.labels(kind=kind).observe(
                    max(0.0, (datetime.now(UTC) - since).total_seconds()))
            return Done("sent")
        self._metrics.twilio_errors.labels(code_class=result.code_class).inc()
        bound = bound.bind(reason=result.reason, code=result.code, attempt=attempt)
        if result.decision == "retry" and attempt < MAX_SEND_ATTEMPTS:
            delay = retry_delay_seconds(attempt)
            await self._jobs.retry_later(
                job.id, result.reason, result.code,
                delay + QUEUED_RETRY_BACKSTOP_SECONDS if queued else delay)
            bound.warning("send_retry_later", delay_seconds=delay)
            return RetryLater(attempt, result.reason) if queued else Done("retry_scheduled")
        if result.decision == "unknown":
            await self._jobs.unknown(job.id, result.reason)
            bound.warning("send_outcome_unknown")
            self._metrics.jobs.labels(kind=job.kind, outcome="unknown").inc()
            return Done("unknown")
        await self._jobs.not_sent(job.id, result.reason, result.code)
        bound.info("send_failed")
        self._metrics.jobs.labels(kind=job.kind, outcome="failed").inc()
        return Done("failed")

    async def _call_provider(self, job: SmsJob | CallJob, callback: str,
                             seconds_left: float | None) -> SendResult:
        if isinstance(job, SmsJob):
            return await self._sender.send_sms(SmsRequest(
                job.to, job.body, job.from_, job.messaging_service_sid, callback,
                validity_period(seconds_left)))
        return await self._sender.send_call(CallRequest(
            job.to, job.from_, job.twiml, job.url, job.max_minutes * 60, callback))


_KIND = re.compile(rb'"kind"\s*:\s*"(sms|call|broadcast|cancel)"')


def _sniff_kind(raw: bytes) -> str | None:
    """Best effort ``kind`` of a job that did not validate (for its dead_lettered event)."""
    match = _KIND.search(raw, 0, 65536)
    return match.group(1).decode() if match else None


_GUARD_REFUSALS = {
    "country_not_allowed": "the account's spend guards do not allow this destination country",
    "price_above_limit": "the message costs more than the account's max_credits_per_message",
}


def _refused(reason: str, detail: str,
             job: SmsJob | CallJob | BroadcastJob | CancelJob) -> DeadLetter:
    """Dead-letter a job that validated: its event echoes its kind and metadata."""
    return DeadLetter(reason, detail, job.id, job.account, job.kind, dict(job.metadata))


def retry_delay_seconds(attempt: int) -> int:
    """The wait before attempt ``attempt + 1``: the retry queues' delays (the last repeats)."""
    return RETRY_DELAYS_SECONDS[min(max(attempt, 1), len(RETRY_DELAYS_SECONDS)) - 1]


def _not_claimed(bound: structlog.typing.FilteringBoundLogger, status: str | None,
                 waited: float) -> Outcome:
    """The outcome of a job whose claim failed: its broadcast was canceled, or the
    reconciler took it over while it waited."""
    if status == "canceled":
        bound.info("job_canceled_before_send")
        return Done("canceled")
    bound.warning("job_taken_over_while_waiting", waited_seconds=round(waited, 3))
    return Done("taken_over")


def _seconds_left(job: SmsJob | CallJob, now: datetime) -> float | None:
    """Seconds until the job expires (negative once it has), or None when it never does."""
    return None if job.expires_at is None else (job.expires_at - now).total_seconds()


def validity_period(seconds_left: float | None) -> int | None:
    """Twilio's ValidityPeriod for a message with ``seconds_left``: whole seconds within
    Twilio's range, else None (no expiry, or longer than Twilio keeps a message anyway)."""
    if seconds_left is None:
        return None
    whole = int(seconds_left)
    low, high = VALIDITY_PERIOD_RANGE
    return whole if low <= whole <= high else None


def _rank(priority: str) -> int:
    """Transactional work first (0), then bulk (1): at every queue a job waits in."""
    return 0 if priority == "transactional" else 1


def _sender_of(job: SmsJob | CallJob) -> str:
    """The rate-limit key: the sending number or Messaging Service."""
    if isinstance(job, SmsJob):
        return job.from_ or job.messaging_service_sid or ""
    return job.from_
