"""Job route: one job's state, history, credits and why it has not gone (yet)."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from dispatcher.api.errors import NotFound
from dispatcher.jobs.view import JobViews


class JobsApi:
    """Handler of ``GET /v1/accounts/{account}/jobs/{job_id}``."""

    def __init__(self, pool: asyncpg.Pool, hold_expiry_seconds: float = 72 * 3600.0) -> None:
        self._views = JobViews(pool, hold_expiry_seconds)

    async def get_job(self, request: web.Request) -> web.Response:
        account, job_id = request.match_info["account"], request.match_info["job_id"]
        # A job of another account is not found, like the account itself (tenant isolation).
        view = await self._views.get(job_id, account)
        if view is None:
            raise NotFound(f"no job {job_id[:128]!r}")
        return web.json_response(text=view.model_dump_json())
