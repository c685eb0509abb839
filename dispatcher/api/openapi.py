"""The OpenAPI 3.1 document of the HTTP API, generated from the route table and pydantic models.

``python -m dispatcher.api`` rewrites ``openapi.json``; a test fails when the committed
file differs from what this module generates, or when a ``/v1`` route is missing from it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from dispatcher.api.auth import Permission
from dispatcher.api.broadcast_bodies import BroadcastIn, PreflightIn, schema_components
from dispatcher.api.schemas import (
    ACCOUNT_PATTERN,
    E164_PATTERN,
    AutoRecharge,
    AutoRechargeUpdate,
    BalanceOut,
    BroadcastAccepted,
    BroadcastProgress,
    CreditsIn,
    CreditsOut,
    ErrorOut,
    JobCanceled,
    LedgerPage,
    MessagingSettings,
    MessagingSettingsUpdate,
    OptOut,
    OptOutPage,
    PageQuery,
    PreflightOut,
    QuietHoursSettings,
    QuietHoursUpdate,
    RefundIn,
    RefundOut,
    SpendGuards,
    SpendGuardsUpdate,
    VelocityReleased,
)
from dispatcher.jobs.contract import ID_PATTERN
from dispatcher.jobs.view import JobView

ACCOUNT = "/v1/accounts/{account}"
BROADCAST_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
DOCUMENT_FILE = "openapi.json"


@dataclass(frozen=True)
class Operation:
    """One route: what it does, who may call it, what it takes and answers."""

    operation_id: str
    method: str
    path: str
    summary: str
    permission: Permission
    responses: Mapping[int, type[BaseModel] | None]
    body: type[BaseModel] | type[msgspec.Struct] | None = None
    paged: bool = False
    idempotent: bool = False
    errors: tuple[int, ...] = field(default=())


OPERATIONS: tuple[Operation, ...] = (
    Operation("getBalance", "GET", f"{ACCOUNT}/balance",
              "Credits by bucket, reserved, available, paused, auto-recharge settings",
              Permission.READ, {200: BalanceOut}),
    Operation("listLedger", "GET", f"{ACCOUNT}/ledger", "Ledger rows, oldest first, paged",
              Permission.READ, {200: LedgerPage}, paged=True),
    Operation("getAutoRecharge", "GET", f"{ACCOUNT}/auto-recharge", "Auto-recharge settings",
              Permission.READ, {200: AutoRecharge}),
    Operation("putAutoRecharge", "PUT", f"{ACCOUNT}/auto-recharge",
              "Change auto-recharge settings (owner, admin)", Permission.BILLING,
              {200: AutoRecharge}, body=AutoRechargeUpdate),
    Operation("getMessagingSettings", "GET", f"{ACCOUNT}/messaging-settings",
              "Messaging settings: Smart Encoding", Permission.READ, {200: MessagingSettings}),
    Operation("putMessagingSettings", "PUT", f"{ACCOUNT}/messaging-settings",
              "Turn Smart Encoding on or off (owner, admin)", Permission.BILLING,
              {200: MessagingSettings}, body=MessagingSettingsUpdate),
    Operation("getSpendGuards", "GET", f"{ACCOUNT}/spend-guards",
              "Spend guards (daily cap, country allowlist, price limit, velocity, transactional "
              "reserve) and today's spend (UTC)", Permission.READ, {200: SpendGuards}),
    Operation("putSpendGuards", "PUT", f"{ACCOUNT}/spend-guards",
              "Replace the spend guards; null turns one off (owner, admin)", Permission.BILLING,
              {200: SpendGuards}, body=SpendGuardsUpdate),
    Operation("releaseVelocityHold", "POST", f"{ACCOUNT}/spend-guards/release-velocity",
              "End a velocity hold: held bulk jobs go on, the window starts afresh "
              "(owner, admin)", Permission.BILLING, {200: VelocityReleased}),
    Operation("addCredits", "POST", f"{ACCOUNT}/credits",
              "Add credits once per Idempotency-Key (owner, admin)", Permission.BILLING,
              {201: CreditsOut}, body=CreditsIn, idempotent=True),
    Operation("refundCredits", "POST", f"{ACCOUNT}/refunds",
              "Refund unspent credits of a purchase once per Idempotency-Key (owner, admin)",
              Permission.BILLING, {201: RefundOut}, body=RefundIn, idempotent=True),
    Operation("listOptOuts", "GET", f"{ACCOUNT}/opt-outs", "The opt-out list, by number",
              Permission.READ, {200: OptOutPage}, paged=True),
    Operation("putOptOut", "PUT", f"{ACCOUNT}/opt-outs/{{number}}",
              "Add a number to the opt-out list (owner, admin, service)",
              Permission.OPT_OUT_WRITE, {200: OptOut, 201: OptOut}, errors=(422,)),
    Operation("deleteOptOut", "DELETE", f"{ACCOUNT}/opt-outs/{{number}}",
              "Take a number off the opt-out list (owner, admin, service)",
              Permission.OPT_OUT_WRITE, {204: None}, errors=(422,)),
    Operation("preflightBroadcast", "POST", f"{ACCOUNT}/broadcasts/preflight",
              "Price a broadcast: credits, segments, countries, skipped recipients, advice "
              "(a pure read; body up to 32 MiB)", Permission.READ, {200: PreflightOut},
              body=PreflightIn),
    Operation("submitBroadcast", "POST", f"{ACCOUNT}/broadcasts",
              "Send a broadcast once per Idempotency-Key after its pre-flight; refused with "
              "insufficient_credits when short and auto-recharge is off (owner, admin, service)",
              Permission.BROADCAST, {202: BroadcastAccepted}, body=BroadcastIn, idempotent=True),
    Operation("getBroadcast", "GET", f"{ACCOUNT}/broadcasts/{{broadcast}}",
              "A broadcast's progress", Permission.READ, {200: BroadcastProgress}),
    Operation("cancelBroadcast", "POST", f"{ACCOUNT}/broadcasts/{{broadcast}}/cancel",
              "Cancel a broadcast (also one published over AMQP: its id is the job id): every "
              "recipient whose provider call has not started ends canceled, credits released, "
              "before the answer; only calls already in flight finish (owner, admin, service)",
              Permission.BROADCAST, {200: BroadcastProgress}),
    Operation("getJob", "GET", f"{ACCOUNT}/jobs/{{job_id}}",
              "A job's state and history (received, held, sending, sent, delivered, failed…, "
              "with times), its reservation and final charge, and while it waits why: held "
              "(balance, credits needed, top-up in flight), scheduled or deferred until a time, "
              "queued for its fair turn, retry_wait, sending; or why it never went (expired…). "
              "A broadcast recipient's job id is <broadcast>:<seq>", Permission.READ,
              {200: JobView}),
    Operation("cancelJob", "POST", f"{ACCOUNT}/jobs/{{job_id}}/cancel",
              "Cancel a job waiting for its send_at or its recipient's quiet hours (or a "
              "broadcast, by its id) before it goes: it ends canceled, nothing charged; "
              "canceling again answers the same; 409 not_cancelable once it is being sent or "
              "done (owner, admin, service)",
              Permission.BROADCAST, {200: JobCanceled}, errors=(409,)),
    Operation("getQuietHours", "GET", f"{ACCOUNT}/quiet-hours",
              "Quiet hours: the daily window of the recipient's local time in which bulk "
              "messages are deferred", Permission.READ, {200: QuietHoursSettings}),
    Operation("putQuietHours", "PUT", f"{ACCOUNT}/quiet-hours",
              "Set quiet hours (both times, HH:MM; both null: none) (owner, admin)",
              Permission.BILLING, {200: QuietHoursSettings}, body=QuietHoursUpdate),
)

ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "invalid_json, idempotency_key_required, invalid_idempotency_key"),
    401: ("Unauthenticated", "unauthenticated: missing, unknown or revoked bearer token"),
    403: ("Forbidden", "forbidden: the token's role may not do this"),
    404: ("NotFound", "not_found: no such account (or not the token's account)"),
    409: ("Conflict", "idempotency_conflict, refund_too_large (details.refundable), "
                      "insufficient_credits (details: shortfall, advice, preflight), "
                      "not_cancelable (details.status)"),
    413: ("PayloadTooLarge", "payload_too_large"),
    422: ("InvalidRequest", "invalid_request (details.errors: location, field, message, type),"
                            " unknown_purchase, schedule_too_far"),
}


def _component_schemas() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorOut, "serialization")]
    for op in OPERATIONS:
        if op.body is not None and issubclass(op.body, BaseModel):
            models.append((op.body, "validation"))
        models += [(m, "serialization") for m in op.responses.values() if m is not None]
    _, schemas = models_json_schema(list(dict.fromkeys(models)),
                                    ref_template="#/components/schemas/{model}")
    return dict(sorted({**schemas["$defs"], **schema_components()}.items()))


def _ref(model: type[BaseModel] | type[msgspec.Struct]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _parameters(op: Operation) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [{"name": "account", "in": "path", "required": True,
                                     "schema": {"type": "string", "pattern": ACCOUNT_PATTERN}}]
    if "{number}" in op.path:
        params.append({"name": "number", "in": "path", "required": True,
                       "description": "E.164 phone number",
                       "schema": {"type": "string", "pattern": E164_PATTERN}})
    if "{broadcast}" in op.path:
        params.append({"name": "broadcast", "in": "path", "required": True,
                       "description": "broadcast id",
                       "schema": {"type": "string", "pattern": BROADCAST_PATTERN}})
    if "{job_id}" in op.path:
        params.append({"name": "job_id", "in": "path", "required": True,
                       "description": "the job's id (a broadcast recipient's: <broadcast>:<seq>)",
                       "schema": {"type": "string", "pattern": ID_PATTERN}})
    if op.paged:
        props = PageQuery.model_json_schema()["properties"]
        params += [{"name": name, "in": "query", "required": False,
                    "schema": {k: v for k, v in props[name].items() if k != "title"}}
                   for name in ("cursor", "limit")]
    if op.idempotent:
        params.append({"name": "Idempotency-Key", "in": "header", "required": True,
                       "description": "Replays with the same body return the first response",
                       "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"}})
    return params


def _error_statuses(op: Operation) -> list[int]:
    # 400 on every route: the HTTP layer itself refuses what it cannot parse (see BadRequest).
    statuses = {400, 401, 403, 404, *op.errors}
    if op.paged:
        statuses.add(422)
    if op.body is not None:
        statuses |= {400, 413, 422}
    if op.idempotent:
        statuses |= {400, 409}
    return sorted(statuses)


def _operation(op: Operation) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, model in op.responses.items():
        responses[str(status)] = {"description": "Success"} if model is None else {
            "description": "Success", "content": {"application/json": {"schema": _ref(model)}}}
    for status in _error_statuses(op):
        responses[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
    doc: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary,
                           "description": f"Permission: {op.permission.value}.",
                           "parameters": _parameters(op), "responses": responses}
    if op.body is not None:
        doc["requestBody"] = {"required": True,
                              "content": {"application/json": {"schema": _ref(op.body)}}}
    return doc


def _inbound_webhook() -> dict[str, Any]:
    form = {"type": "object", "properties": {
        name: {"type": "string"} for name in ("From", "To", "Body", "MessageSid", "AccountSid")}}
    return {"post": {
        "operationId": "twilioInbound", "security": [],
        "summary": "Twilio inbound message webhook: STOP/START/HELP keywords",
        "parameters": [
            {"name": "account", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": ACCOUNT_PATTERN}},
            {"name": "X-Twilio-Signature", "in": "header", "required": True,
             "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": form}}},
        "responses": {
            "200": {"description": "TwiML reply",
                    "content": {"text/xml": {"schema": {"type": "string"}}}},
            "400": {"description": "invalid_form", "content": {
                "application/json": {"schema": _ref(ErrorOut)}}},
            "403": {"description": "invalid_signature", "content": {
                "application/json": {"schema": _ref(ErrorOut)}}},
            "404": {"$ref": "#/components/responses/NotFound"},
            "413": {"$ref": "#/components/responses/PayloadTooLarge"},
            "415": {"description": "unsupported_media_type", "content": {
                "application/json": {"schema": _ref(ErrorOut)}}}}}}


def build_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document for every ``/v1`` route and the inbound webhook."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    paths["/twilio/inbound/{account}"] = _inbound_webhook()
    responses: dict[str, dict[str, Any]] = {
        name: {"description": codes, "content": {"application/json": {"schema": _ref(ErrorOut)}}}
        for name, codes in ERRORS.values()}
    responses["BadRequest"]["content"]["text/plain"] = {"schema": {
        "type": "string", "description": "a request the HTTP layer cannot parse, such as a "
                                         "request line or header over 8 KiB"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "dispatcher API", "version": "1.0.0",
                 "description": "Balances, ledger, billing settings, credits, refunds, "
                                "opt-outs and broadcasts (pre-flight, submission, progress, "
                                "cancel) per account. Errors are JSON with a stable code."},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "dsp_… token of a role"}},
            "schemas": _component_schemas(),
            "responses": responses,
        },
    }


def render(document: Mapping[str, Any]) -> str:
    """The committed text form of the document."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


@cache
def document_bytes() -> bytes:
    """The committed document, as served."""
    return resources.files("dispatcher.api").joinpath(DOCUMENT_FILE).read_bytes()


async def serve_openapi(_: web.Request) -> web.Response:
    """``GET /openapi.json`` (public)."""
    return web.Response(body=document_bytes(), content_type="application/json")


def main() -> None:
    """Rewrite ``openapi.json`` beside this module."""
    Path(__file__).with_name(DOCUMENT_FILE).write_text(render(build_document()),
                                                       encoding="utf-8")
