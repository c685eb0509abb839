"""Twilio status callbacks: verify the signature, then settle the job to its real cost.

The job id is in the callback URL, so a callback binds the provider SID even when the create
answer was lost. Status only moves forward; callbacks arrive out of order and twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import structlog
from aiohttp import web

from dispatcher.jobs.group_commit import GroupCommit
from dispatcher.jobs.store import JobReport, JobStore
from dispatcher.metrics import Metrics
from dispatcher.twilio.signatures import SignatureCheck, form_fields, last_values

log = structlog.get_logger(__name__)

# Provider status -> (our status, settle now?). Twilio bills undelivered messages but not
# failed ones; it bills completed calls by the minute and not busy/no-answer/failed/canceled.
SMS_STATUSES: dict[str, tuple[str, bool]] = {
    "queued": ("sent", False), "accepted": ("sent", False), "sending": ("sent", False),
    "sent": ("sent", False), "delivered": ("delivered", True),
    "undelivered": ("undelivered", True), "failed": ("failed", True),
}
CALL_STATUSES: dict[str, tuple[str, bool]] = {
    "queued": ("sent", False), "initiated": ("sent", False), "ringing": ("sent", False),
    "in-progress": ("sent", False), "completed": ("delivered", True),
    "busy": ("failed", True), "no-answer": ("failed", True), "failed": ("failed", True),
    "canceled": ("failed", True),
}


@dataclass(frozen=True)
class ProviderStatus:
    """A provider status report, whether from a callback or from asking the provider."""

    sid: str | None
    status: str
    settle: bool
    units: int | None
    error_code: int | None


def read_sms_status(params: dict[str, str]) -> ProviderStatus | None:
    """Parse a message status callback; None when the status is not one we know."""
    raw = params.get("MessageStatus") or params.get("SmsStatus") or ""
    if raw not in SMS_STATUSES:
        return None
    status, settle = SMS_STATUSES[raw]
    segments = params.get("NumSegments")
    return ProviderStatus(params.get("MessageSid") or params.get("SmsSid"), status, settle,
                          int(segments) if segments and segments.isdigit() else None,
                          _int(params.get("ErrorCode")))


def read_call_status(params: dict[str, str]) -> ProviderStatus | None:
    """Parse a call status callback; billed minutes are the duration rounded up."""
    raw = params.get("CallStatus", "")
    if raw not in CALL_STATUSES:
        return None
    status, settle = CALL_STATUSES[raw]
    seconds = _int(params.get("CallDuration") or params.get("Duration"))
    minutes = math.ceil(seconds / 60) if seconds is not None else None
    return ProviderStatus(params.get("CallSid"), status, settle, minutes,
                          _int(params.get("ErrorCode")))


def _int(text: str | None) -> int | None:
    return int(text) if text and text.lstrip("-").isdigit() else None


class StatusCallbacks:
    """The aiohttp handler for ``POST /twilio/status/{job_id}``.

    Concurrent callbacks are settled together (see group_commit): one round trip and one
    transaction for a batch, and each answers 204 only once its batch is committed. One batch
    at a time by default: a broadcast's callbacks all lock the same account row, so a second
    batch in flight would mostly wait for the first while holding a pool connection.
    """

    def __init__(self, jobs: JobStore, auth_token: str, public_base_url: str,
                 metrics: Metrics, *, max_batch: int = 200, concurrency: int = 1) -> None:
        self._jobs = jobs
        self._signature = SignatureCheck(auth_token, public_base_url)
        self._forged = metrics.status_callbacks.labels(result="forged")
        self._accepted = metrics.status_callbacks.labels(result="accepted")
        self._ignored = metrics.status_callbacks.labels(result="ignored")
        self._reports: GroupCommit[JobReport, str] = GroupCommit(
            self._jobs.provider_status_many, self._apply_one, max_batch=max_batch,
            concurrency=concurrency)

    async def handle(self, request: web.Request) -> web.Response:
        form = form_fields(await request.post())
        if not self._signature.valid_request(request, form):
            self._forged.inc()
            log.warning("status_callback_forged", path=request.rel_url.path)
            raise web.HTTPForbidden(text='{"code": "invalid_signature"}',
                                    content_type="application/json")
        job_id = request.match_info["job_id"]
        result = await self.apply(job_id, last_values(form))
        (self._ignored if result in ("ignored", "unknown_job") else self._accepted).inc()
        log.info("status_callback", job_id=job_id, result=result)
        return web.Response(status=204)

    async def apply(self, job_id: str, params: dict[str, str]) -> str:
        """Apply one callback's report, batched with the reports arriving meanwhile."""
        report = job_report(job_id, params)
        if report is None:  # no known status, or both a message and a call status: rare
            return await apply_status(self._jobs, job_id, params)
        return await self._reports.submit(report)

    async def _apply_one(self, report: JobReport) -> str:
        return (await self._jobs.provider_status_many([report]))[0]


def job_report(job_id: str, params: dict[str, str]) -> JobReport | None:
    """The report of a message or a call callback; None unless exactly one of them parses."""
    sms, call = read_sms_status(params), read_call_status(params)
    if (sms is None) == (call is None):
        return None
    kind, report = ("sms", sms) if sms is not None else ("call", call)
    assert report is not None
    return JobReport(job_id, kind, report.sid, report.status, report.settle, report.units,
                     report.error_code)


async def apply_status(jobs: JobStore, job_id: str, params: dict[str, str]) -> str:
    """Apply a provider status report to the job; returns the job's status afterwards."""
    job = await jobs.get(job_id)
    if job is None:
        return "unknown_job"
    report = read_sms_status(params) if job["kind"] == "sms" else read_call_status(params)
    if report is None:
        return "ignored"
    return await apply_report(jobs, job, report)


async def apply_report(jobs: JobStore, job: dict[str, object], report: ProviderStatus) -> str:
    """Settle to the real cost: units reported x the rate the job was reserved at."""
    units = report.units if report.units is not None else int(str(job["units"]))
    cost = units * int(str(job["rate"]))
    return await jobs.provider_status(str(job["job_id"]), report.sid, report.status,
                                      cost=cost, error_code=report.error_code,
                                      settle=report.settle)
