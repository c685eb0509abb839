"""Status progression and signed status callbacks, the way Twilio sends them.

Every accepted message or call walks its statuses (queued → sent → delivered; initiated →
ringing → in-progress → completed) on a bounded queue served by a few worker tasks, never in
the create request. Each step updates the resource, then, when a StatusCallback URL was given,
POSTs form-encoded parameters signed with ``X-Twilio-Signature``. Receivers that are down are
retried a few times with backoff, then skipped.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import re
from collections import deque
from dataclasses import dataclass
from urllib.parse import quote_plus, urlsplit

import aiohttp
import structlog

from dispatcher.sandbox.poster import FormPoster, PostFailed
from dispatcher.sandbox.resources import API_VERSION, ERRORS, FAILED_DELIVERY, now, rfc2822
from dispatcher.sandbox.state import CallbackRecord, CreateRecord, SandboxState

log = structlog.get_logger(__name__)
FORM = "application/x-www-form-urlencoded"
_UNQUOTED = re.compile(r"[A-Za-z0-9_.~-]*")


def sign(token: bytes, url: str, params: dict[str, str]) -> str:
    """``X-Twilio-Signature``: base64 HMAC-SHA1 of the URL and the sorted name+value pairs."""
    text = url + "".join(name + params[name] for name in sorted(params))
    return base64.b64encode(hmac.new(token, text.encode(), hashlib.sha1).digest()).decode()


def form_body(params: dict[str, str]) -> bytes:
    """``urlencode(params)``, without quoting the values that need none (most of them)."""
    return "&".join(
        f"{quote_plus(k)}={v if _UNQUOTED.fullmatch(v) else quote_plus(v)}"
        for k, v in params.items()).encode()


@dataclass(frozen=True)
class Step:
    """One status a resource moves to; ``event`` is the call event that subscribes to it."""

    status: str
    resource_status: str
    event: str | None = None


@dataclass
class _Job:
    record: CreateRecord
    steps: tuple[Step, ...]
    error_code: int | None
    duration: int
    index: int = 0
    attempt: int = 0
    sequence: int = 0


def message_steps(delivery_error: int | None) -> tuple[Step, ...]:
    """queued → sent → delivered, or → undelivered / failed when a delivery error is set."""
    if delivery_error in FAILED_DELIVERY:
        return Step("queued", "queued"), Step("failed", "failed")
    final = "undelivered" if delivery_error else "delivered"
    return Step("queued", "queued"), Step("sent", "sent"), Step(final, final)


def call_steps(ending: str) -> tuple[Step, ...]:
    """initiated → ringing → in-progress → completed, or → busy / no-answer / failed."""
    start = (Step("initiated", "queued", "initiated"), Step("ringing", "ringing", "ringing"))
    if ending == "completed":
        return (*start, Step("in-progress", "in-progress", "answered"),
                Step("completed", "completed", "completed"))
    return (*start, Step(ending, ending, "completed"))


class CallbackDispatcher:
    """Walks resources through their statuses and delivers their signed callbacks."""

    def __init__(self, state: SandboxState, *, workers: int = 8, queue_size: int = 10_000,
                 timeout: float = 5.0, retries: int = 3, retry_delay: float = 0.05) -> None:
        self._state = state
        self._workers = workers
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        self._overflow: deque[_Job] = deque()  # follow-up steps that found the queue full
        self._timeout = timeout
        self._retries = retries
        self._retry_delay = retry_delay
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._session: aiohttp.ClientSession | None = None
        self._poster: FormPoster | None = None
        self._token = state.auth_token.encode()
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        """Open the HTTP session and start the workers."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            connector=aiohttp.TCPConnector(limit=self._workers * 2))
        self._poster = FormPoster(self._session, self._timeout, max_idle_per_host=self._workers)
        self._tasks = [asyncio.create_task(self._work(), name=f"sandbox_callbacks_{i}")
                       for i in range(self._workers)]

    async def stop(self) -> None:
        """Stop the workers, drop pending steps, close the session."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._poster is not None:
            await self._poster.close()
            self._poster = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def track(self, record: CreateRecord, delivery_error: int | None = None) -> None:
        """Start a newly created resource on its status progression (waits if the queue is full)."""
        if record.kind == "sms":
            job = _Job(record, message_steps(delivery_error), delivery_error, 0)
        else:
            ending, seconds = self._state.call_ending(record.to, record.time_limit)
            job = _Job(record, call_steps(ending), None, seconds)
        self._pending += 1
        self._idle.clear()
        if not self._overflow:
            try:
                self._queue.put_nowait(job)
                return
            except asyncio.QueueFull:
                pass
        # Shielded: a client that gives up must not leave the resource without callbacks.
        await asyncio.shield(self._queue.put(job))

    async def wait_idle(self, seconds: float = 5.0) -> None:
        """Wait until every tracked resource reached its final status (for tests)."""
        async with asyncio.timeout(seconds):
            await self._idle.wait()

    async def _work(self) -> None:
        while True:
            job = self._overflow.popleft() if self._overflow else await self._queue.get()
            try:
                await self._run(job)
            except Exception:
                log.exception("sandbox_callback_worker_error", sid=job.record.sid)
                self._finish()

    async def _run(self, job: _Job) -> None:
        step = job.steps[job.index]
        if job.attempt == 0:
            self._apply(job, step)
        url = job.record.status_callback
        if url and self._state.scenario.callbacks_enabled and self._subscribed(job, step):
            http_status = await self._post(url, self._params(job, step), job, step)
            if (http_status is None or http_status >= 500) and job.attempt < self._retries:
                job.attempt += 1
                self._later(job, self._retry_delay * 2 ** (job.attempt - 1))
                return
            self._state.callbacks.append(CallbackRecord(
                str(job.record.sid), url, step.status, job.attempt + 1, http_status))
            job.sequence += 1
        job.index += 1
        job.attempt = 0
        if job.index < len(job.steps):
            self._later(job, self._state.scenario.callback_delay_ms / 1000)
        else:
            self._finish()

    def _subscribed(self, job: _Job, step: Step) -> bool:
        if job.record.kind == "sms":
            return True
        events = job.record.callback_events or ("completed",)
        return step.event in events

    def _apply(self, job: _Job, step: Step) -> None:
        """Move the resource to the step's status, as a later fetch will show it."""
        record, moment = job.record, now()
        record.status = step.resource_status
        record.date_updated = moment
        if step.status == "sent":
            record.date_sent = moment
        if step.status == "in-progress":
            record.start_time = moment
        if job.index == len(job.steps) - 1:
            record.error_code = job.error_code
            if record.kind == "call":
                record.end_time = moment
                record.duration = job.duration

    def _params(self, job: _Job, step: Step) -> dict[str, str]:
        record = job.record
        params = {"AccountSid": self._state.account_sid, "ApiVersion": API_VERSION,
                  "To": record.to}
        if record.from_:
            params["From"] = record.from_
        if record.kind == "sms":
            params.update(MessageSid=str(record.sid), SmsSid=str(record.sid),
                          MessageStatus=step.status, SmsStatus=step.status,
                          NumSegments=str(record.num_segments))
            if record.messaging_service_sid:
                params["MessagingServiceSid"] = record.messaging_service_sid
            if job.index == len(job.steps) - 1 and job.error_code:
                params["ErrorCode"] = str(job.error_code)
                params["ErrorMessage"] = ERRORS.get(job.error_code, (0, ""))[1]
            return params
        params.update(CallSid=str(record.sid), CallStatus=step.status, Called=record.to,
                      Caller=record.from_ or "", Direction="outbound-api",
                      CallbackSource="call-progress-events", SequenceNumber=str(job.sequence),
                      Timestamp=str(rfc2822(now())))
        if job.index == len(job.steps) - 1:
            # CallDuration is seconds; Duration is the billed length in whole minutes.
            params["CallDuration"] = str(job.duration)
            params["Duration"] = str(math.ceil(job.duration / 60))
        return params

    async def _post(self, url: str, params: dict[str, str], job: _Job, step: Step) -> int | None:
        assert self._poster is not None
        headers = {"Content-Type": FORM, "User-Agent": "TwilioProxy/1.1",
                   "X-Twilio-Signature": sign(self._token, url, params)}
        try:
            return await self._poster.post(url, form_body(params), headers)
        except (PostFailed, TimeoutError) as exc:
            parts = urlsplit(url)
            log.warning("sandbox_callback_failed", sid=job.record.sid, status=step.status,
                        attempt=job.attempt + 1, host=parts.netloc, path=parts.path,
                        error=type(exc).__name__)
            return None

    def _later(self, job: _Job, delay: float) -> None:
        if delay <= 0:
            self._enqueue(job)
            return
        loop = asyncio.get_running_loop()
        self._timers[id(job)] = loop.call_later(delay, self._fire, job)

    def _fire(self, job: _Job) -> None:
        self._timers.pop(id(job), None)
        self._enqueue(job)

    def _enqueue(self, job: _Job) -> None:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._overflow.append(job)

    def _finish(self) -> None:
        self._pending -= 1
        if self._pending <= 0:
            self._pending = 0
            self._idle.set()
