"""Scheduling routes: cancel a job before it goes, and the account's quiet hours."""

from __future__ import annotations

from datetime import time

import asyncpg
import structlog
from aiohttp import web

from dispatcher.api.auth import principal
from dispatcher.api.errors import NotCancelable, NotFound
from dispatcher.api.parsing import read_json
from dispatcher.api.schemas import JobCanceled, QuietHoursSettings, QuietHoursUpdate
from dispatcher.broadcasts.runner import Broadcasts
from dispatcher.jobs.store import JobStore
from dispatcher.pricing.quiet_hours import parse_clock
from dispatcher.queries import q

log = structlog.get_logger(__name__)


def _clock(value: time | None) -> str | None:
    return value.strftime("%H:%M") if value is not None else None


class ScheduleApi:
    """Handlers of ``/v1/accounts/{account}/jobs/{job_id}/cancel`` and ``…/quiet-hours``."""

    def __init__(self, pool: asyncpg.Pool, broadcasts: Broadcasts) -> None:
        self._pool = pool
        self._jobs = JobStore(pool)
        self._broadcasts = broadcasts

    async def post_cancel_job(self, request: web.Request) -> web.Response:
        """Cancel a scheduled or deferred job (or a broadcast, by its id): nothing charged."""
        account, job_id = request.match_info["account"], request.match_info["job_id"]
        status = await self._jobs.cancel_target(account, job_id)
        log.info("job_cancel_api", account_id=account, job_id=job_id, status=status,
                 token_id=principal(request).token_id)
        if status == "unknown":
            raise NotFound(f"no job {job_id!r}")
        if status != "canceled":
            raise NotCancelable(f"the job is {status}, no longer waiting for its time",
                                status=status)
        self._broadcasts.notify_canceled(job_id)
        return web.json_response(JobCanceled(job_id=job_id, status="canceled").model_dump(
            mode="json"))

    async def get_quiet_hours(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        row = await self._pool.fetchrow(q("get_quiet_hours"), account)
        if row is None:
            raise NotFound(f"no account {account!r}")
        return self._answer(row)

    async def put_quiet_hours(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        body = await read_json(request, QuietHoursUpdate)
        start = parse_clock(body.start) if body.start is not None else None
        end = parse_clock(body.end) if body.end is not None else None
        row = await self._pool.fetchrow(q("set_quiet_hours"), account, start, end)
        if row is None:
            raise NotFound(f"no account {account!r}")
        log.info("quiet_hours_changed", account_id=account, start=body.start, end=body.end,
                 token_id=principal(request).token_id)
        return self._answer(row)

    @staticmethod
    def _answer(row: asyncpg.Record) -> web.Response:
        out = QuietHoursSettings(start=_clock(row["quiet_hours_start"]),
                                 end=_clock(row["quiet_hours_end"]))
        return web.json_response(out.model_dump(mode="json"))
