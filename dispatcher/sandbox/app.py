"""The Twilio-compatible sandbox HTTP server: Messages and Calls of the 2010-04-01 API.

Creates are authenticated and validated like Twilio does, then the scenario decides what the
answer is (success, a Twilio error, HTTP 500 after accepting, or no answer at all). A control
API under ``/_sandbox`` reads and changes the same state tests use in-process.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, cast

import structlog
from aiohttp import web
from multidict import MultiDictProxy

from dispatcher.sandbox import resources as rs
from dispatcher.sandbox.callbacks import CallbackDispatcher
from dispatcher.sandbox.state import CreateRecord, Kind, Plan, SandboxState, Scenario

log = structlog.get_logger(__name__)
ACCOUNT = "/2010-04-01/Accounts/{account_sid}"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _basic(account_sid: str, auth_token: str) -> str:
    return "Basic " + base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()


@web.middleware
async def _twilio_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error under the API prefix as Twilio's JSON error body."""
    try:
        return await handler(request)
    except rs.TwilioApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPNotFound:
        if not request.path.startswith("/2010-04-01/"):
            raise
        exc404 = rs.TwilioApiError(
            20404, message=f"The requested resource {request.path} was not found")
        return web.json_response(exc404.body(), status=404)


class SandboxServer:
    """Runs the sandbox app on a loopback port, in-process or standalone."""

    def __init__(self, state: SandboxState | None = None, *, account_sid: str | None = None,
                 auth_token: str | None = None, scenario: Scenario | None = None,
                 callback_workers: int = 8, callback_timeout: float = 5.0,
                 callback_retries: int = 3) -> None:
        self.state = state or SandboxState(account_sid, auth_token, scenario)
        self.callbacks = CallbackDispatcher(self.state, workers=callback_workers,
                                            timeout=callback_timeout, retries=callback_retries)
        self.base_url = ""
        self._auth = _basic(self.state.account_sid, self.state.auth_token)
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        """The aiohttp application with Twilio's routes and the control API."""
        app = web.Application(middlewares=[_twilio_errors])
        app.router.add_post(f"{ACCOUNT}/Messages.json", self._create_message)
        app.router.add_get(f"{ACCOUNT}/Messages.json", self._list_messages)
        app.router.add_get(f"{ACCOUNT}/Messages/{{sid}}.json", self._fetch)
        app.router.add_post(f"{ACCOUNT}/Calls.json", self._create_call)
        app.router.add_get(f"{ACCOUNT}/Calls.json", self._list_calls)
        app.router.add_get(f"{ACCOUNT}/Calls/{{sid}}.json", self._fetch)
        app.router.add_get("/_sandbox/scenario", self._get_scenario)
        app.router.add_post("/_sandbox/scenario", self._post_scenario)
        app.router.add_get("/_sandbox/creates", self._get_creates)
        app.router.add_get("/_sandbox/callbacks", self._get_callbacks)
        app.router.add_post("/_sandbox/reset", self._reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port); returns the base URL."""
        self._stopping.clear()
        await self.callbacks.start()
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        await site.start()
        bound = self._runner.addresses[0]
        self.base_url = f"http://{host}:{bound[1]}"
        log.info("sandbox_started", base_url=self.base_url, account_sid=self.state.account_sid)
        return self.base_url

    async def stop(self) -> None:
        """Release hanging requests, stop serving, stop the callback workers."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.callbacks.stop()
        log.info("sandbox_stopped")

    def _authenticate(self, request: web.Request) -> None:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), self._auth.encode()):
            raise rs.TwilioApiError(20003)
        if request.match_info["account_sid"] != self.state.account_sid:
            raise rs.TwilioApiError(20003)

    async def _create_message(self, request: web.Request) -> web.StreamResponse:
        self._authenticate(request)
        form = await request.post()
        record = _message_record(form)
        return await self._create(record, _validate_message(form), rs.message_json)

    async def _create_call(self, request: web.Request) -> web.StreamResponse:
        self._authenticate(request)
        form = await request.post()
        record = _call_record(form)
        return await self._create(record, _validate_call(form), rs.call_json)

    async def _create(self, record: CreateRecord, invalid: rs.TwilioApiError | None,
                      render: Callable[[CreateRecord, str], dict[str, Any]]) -> web.Response:
        plan = Plan("refuse", error_code=invalid.code) if invalid else self.state.decide(record.to)
        latency = self.state.scenario.latency_ms
        if latency > 0:
            await asyncio.sleep(latency / 1000)
        if plan.action in ("refuse", "hang"):
            error = invalid or rs.TwilioApiError(plan.error_code or 20500, plan.http_status)
            record.outcome = "hang" if plan.action == "hang" else "refused"
            record.error_code = None if plan.action == "hang" else error.code
            record.http_status = None if plan.action == "hang" else error.status
            self.state.add(record)
            if plan.action == "hang":
                await self._hang()
            raise error
        record.outcome = {"accept": "accepted", "accept_then_500": "accepted_then_500",
                          "accept_then_hang": "accepted_then_hang"}[plan.action]
        record.http_status = {"accept": 201, "accept_then_500": 500}.get(plan.action)
        self.state.add(record)
        await self.callbacks.track(record, plan.delivery_error)
        if plan.action == "accept_then_500":
            raise rs.TwilioApiError(20500)
        if plan.action == "accept_then_hang":
            await self._hang()
        return web.json_response(render(record, self.state.account_sid), status=201)

    async def _hang(self) -> None:
        """Never answer: wait until the client disconnects (we are cancelled) or we stop."""
        await self._stopping.wait()
        raise rs.TwilioApiError(20503)

    async def _fetch(self, request: web.Request) -> web.Response:
        self._authenticate(request)
        record = self.state.get(request.match_info["sid"])
        kind: Kind = "sms" if "/Messages/" in request.path else "call"
        if record is None or record.kind != kind:
            raise web.HTTPNotFound()
        render = rs.message_json if kind == "sms" else rs.call_json
        return web.json_response(render(record, self.state.account_sid))

    async def _list_messages(self, request: web.Request) -> web.Response:
        return self._list(request, "sms", "messages", rs.message_json)

    async def _list_calls(self, request: web.Request) -> web.Response:
        return self._list(request, "call", "calls", rs.call_json)

    def _list(self, request: web.Request, kind: Kind, key: str,
              render: Callable[[CreateRecord, str], dict[str, Any]]) -> web.Response:
        """Twilio's list read: newest first, filtered, in pages linked by ``next_page_uri``."""
        self._authenticate(request)
        query = request.query
        to, sender = query.get("To"), query.get("From")
        try:
            window = rs.DateWindow.from_query(query, "DateSent" if kind == "sms" else "StartTime")
            page = rs.PageRequest.from_query(query)
        except ValueError as exc:
            raise rs.TwilioApiError(20001, 400, str(exc)) from exc
        found = [r for r in reversed(self.state.creates(kind=kind, to=to, accepted=True))
                 if (sender is None or r.from_ == sender)
                 and window.holds(r.date_sent if kind == "sms" else r.start_time)]
        return web.json_response(rs.list_page(
            key, request.path, query, [(r.sid or "", render(r, self.state.account_sid))
                                       for r in found], page))

    async def _get_scenario(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.scenario.to_json())

    async def _post_scenario(self, request: web.Request) -> web.Response:
        try:
            scenario = Scenario.from_json(await request.json())
        except (ValueError, TypeError, AttributeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.state.set_scenario(scenario)
        log.info("sandbox_scenario_set", numbers=len(scenario.numbers))
        return web.json_response(scenario.to_json())

    async def _get_creates(self, request: web.Request) -> web.Response:
        query = request.query
        accepted, kind = query.get("accepted"), query.get("kind")
        if kind not in (None, "sms", "call"):
            return web.json_response({"error": "kind must be sms or call"}, status=400)
        found = self.state.creates(
            to=query.get("to"), status_callback=query.get("status_callback"),
            kind=cast(Kind | None, kind),
            accepted=None if accepted is None else accepted.lower() in ("1", "true"))
        return web.json_response({"count": len(found), "creates": [r.to_json() for r in found]},
                                 dumps=_dumps)

    async def _get_callbacks(self, request: web.Request) -> web.Response:
        sid = request.query.get("sid")
        found = [c for c in self.state.callbacks if sid is None or c.sid == sid]
        return web.json_response({"count": len(found), "callbacks": [asdict(c) for c in found]})

    async def _reset(self, request: web.Request) -> web.Response:
        self.state.reset()
        log.info("sandbox_reset")
        return web.json_response({"reset": True})


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)


def _message_record(form: MultiDictProxy[Any]) -> CreateRecord:
    body = form.get("Body")
    return CreateRecord(
        kind="sms", to=str(form.get("To", "")), from_=_opt(form.get("From")),
        body=None if body is None else str(body),
        status_callback=_opt(form.get("StatusCallback")), time_limit=None,
        received_at=rs.now(), outcome="",
        messaging_service_sid=_opt(form.get("MessagingServiceSid")),
        num_segments=rs.count_segments(str(body or "")),
        validity_period=_validity_period(form))


def _call_record(form: MultiDictProxy[Any]) -> CreateRecord:
    limit = str(form.get("TimeLimit", ""))
    return CreateRecord(
        kind="call", to=str(form.get("To", "")), from_=_opt(form.get("From")), body=None,
        status_callback=_opt(form.get("StatusCallback")),
        time_limit=int(limit) if limit.isdigit() else None, received_at=rs.now(), outcome="",
        callback_events=tuple(str(e) for e in form.getall("StatusCallbackEvent", [])))


def _validity_period(form: MultiDictProxy[Any]) -> int | None:
    """ValidityPeriod as an integer when it is one (else None: the create is refused)."""
    text = str(form.get("ValidityPeriod", ""))
    return int(text) if text.isdigit() else None


def _opt(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _validate_message(form: MultiDictProxy[Any]) -> rs.TwilioApiError | None:
    """Twilio's checks on a message create, in its order; None when valid."""
    to, sender = str(form.get("To", "")), str(form.get("From", ""))
    service = str(form.get("MessagingServiceSid", ""))
    body = str(form.get("Body", ""))
    if not to:
        return rs.TwilioApiError(21604)
    if not sender and not service:
        return rs.TwilioApiError(21603)
    if service and not rs.MESSAGING_SERVICE_SID.match(service):
        return rs.TwilioApiError(21701)
    if sender and not (rs.E164.match(sender) or rs.SHORT_CODE.match(sender)
                       or rs.ALPHA_SENDER.match(sender)):
        return rs.TwilioApiError(21606)
    if not body and not form.get("MediaUrl") and not form.get("ContentSid"):
        return rs.TwilioApiError(21602)
    if len(body) > rs.MAX_BODY:
        return rs.TwilioApiError(21617)
    validity = str(form.get("ValidityPeriod", "1"))
    # Twilio's OpenAPI: an integer from 1 to 36000 (seconds); anything else is error 21624.
    if not (validity.isdigit() and 1 <= int(validity) <= rs.MAX_VALIDITY_PERIOD):
        return rs.TwilioApiError(21624)
    if not rs.E164.match(to):
        return rs.TwilioApiError(21211)
    return None


def _validate_call(form: MultiDictProxy[Any]) -> rs.TwilioApiError | None:
    """Twilio's checks on a call create; None when valid."""
    to, sender = str(form.get("To", "")), str(form.get("From", ""))
    if not to:
        return rs.TwilioApiError(21201)
    if not sender:
        return rs.TwilioApiError(21213)
    if not (form.get("Url") or form.get("Twiml") or form.get("ApplicationSid")):
        return rs.TwilioApiError(21205)
    if not rs.E164.match(to):
        return rs.TwilioApiError(21211)
    if not rs.E164.match(sender):
        return rs.TwilioApiError(21212)
    return None
