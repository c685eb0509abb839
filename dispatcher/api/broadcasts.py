"""Broadcast routes: pre-flight (a pure read), submission, progress and cancel.

Submission runs the pre-flight and refuses, with ``insufficient_credits`` and the advice, a
broadcast the account cannot pay for while auto-recharge is off; otherwise it stores the
broadcast in the Idempotency-Key's transaction and the runner fans it out.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import UTC, datetime

import msgspec
import structlog
from aiohttp import web

from dispatcher.api.auth import principal
from dispatcher.api.broadcast_bodies import (
    MAX_BODY_BYTES,
    BroadcastIn,
    PreflightIn,
    columns,
    decode,
)
from dispatcher.api.errors import NotFound, ScheduleTooFar
from dispatcher.api.idempotency import Outcome, run_once
from dispatcher.api.parsing import idempotency_key, read_body
from dispatcher.broadcasts.preflight import gc_paused
from dispatcher.broadcasts.runner import (
    Broadcasts,
    BroadcastSpec,
    progress,
    store_broadcast,
)
from dispatcher.db import Connection
from dispatcher.jobs.contract import schedule_too_far
from dispatcher.pricing.templates import Template

log = structlog.get_logger(__name__)


def _timed(response: web.Response, started: float) -> web.Response:
    response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1e3:.1f}"
    return response


def _broadcast_id() -> str:
    return f"bc_{uuid.uuid4().hex}"


class BroadcastsApi:
    """Handlers of ``/v1/accounts/{account}/broadcasts…``."""

    def __init__(self, broadcasts: Broadcasts) -> None:
        self._broadcasts = broadcasts
        self._pool = broadcasts.pool

    async def post_preflight(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        account = request.match_info["account"]
        body = decode(await read_body(request, MAX_BODY_BYTES), PreflightIn)
        with gc_paused():
            recipients = columns(body)
        result = await self._broadcasts.preflight(account, Template(body.body, body.footer),
                                                  recipients, body.send_at, body.priority)
        log.info("broadcast_preflight", account_id=account, recipients=result.recipients,
                 advice=result.advice, token_id=principal(request).token_id)
        return _timed(web.json_response(result.as_json()), started)

    async def post_broadcast(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        account = request.match_info["account"]
        key = idempotency_key(request)
        body = decode(await read_body(request, MAX_BODY_BYTES), BroadcastIn)
        caller = principal(request)
        spec = BroadcastSpec(account, body.body, body.footer, body.priority, body.from_,
                             body.messaging_service_sid, columns(body),
                             expires_at=body.expiry(datetime.now(UTC)),
                             send_at=body.send_at.astimezone(UTC) if body.send_at else None)
        too_far = schedule_too_far(spec.send_at, self._broadcasts.now())
        if too_far is not None:
            raise ScheduleTooFar(too_far, field="send_at")

        async def submit(conn: Connection) -> Outcome:
            result = await self._broadcasts.check(spec, refuse_if_short=True)
            broadcast_id = _broadcast_id()
            scheduled = self._broadcasts.scheduled(spec)
            await store_broadcast(conn, broadcast_id, spec, result, scheduled=scheduled)
            log.info("broadcast_submitted_api", account_id=account, broadcast_id=broadcast_id,
                     recipients=result.recipients, scheduled=scheduled,
                     token_id=caller.token_id)
            return 202, {"broadcast_id": broadcast_id,
                         "status": "scheduled" if scheduled else "running",
                         "preflight": result.as_json()}

        request_hash = hashlib.sha256(b"broadcast\n" + msgspec.json.encode(body)).digest()
        response = await run_once(self._pool, account, key, caller.token_id, request_hash,
                                  submit)
        self._broadcasts.wake()
        return _timed(response, started)

    async def get_broadcast(self, request: web.Request) -> web.Response:
        account, broadcast_id = request.match_info["account"], request.match_info["broadcast"]
        found = await progress(self._pool, broadcast_id)
        if found is None or found.account != account:
            raise NotFound(f"no broadcast {broadcast_id!r}")
        return web.json_response(found.as_json())

    async def post_cancel(self, request: web.Request) -> web.Response:
        account, broadcast_id = request.match_info["account"], request.match_info["broadcast"]
        found = await progress(self._pool, broadcast_id)
        if found is None or found.account != account:
            raise NotFound(f"no broadcast {broadcast_id!r}")
        status = await self._broadcasts.cancel(broadcast_id)
        log.info("broadcast_cancel_api", account_id=account, broadcast_id=broadcast_id,
                 status=status, token_id=principal(request).token_id)
        after = await progress(self._pool, broadcast_id)
        assert after is not None
        return web.json_response(after.as_json())
