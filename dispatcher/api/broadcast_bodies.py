"""Broadcast request bodies: msgspec structs, decoded and checked fast enough for 100k recipients.

pydantic spends most of a 100k-recipient body in the garbage collector (~300 ms); msgspec
structs without GC tracking, decoded with the collector paused, take ~60 ms. The OpenAPI
document takes these bodies' schemas from msgspec, so the document and the decoder agree.
Recipient numbers are not checked here: a bad number is skipped by the pre-flight, with a reason.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import chain
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from pydantic import TypeAdapter, ValidationError

from dispatcher.api.errors import InvalidJson, InvalidRequest
from dispatcher.api.parsing import invalid_json, position
from dispatcher.broadcasts.preflight import Recipients, gc_paused
from dispatcher.jobs.contract import (
    MAX_BROADCAST_BYTES,
    MAX_VALIDITY_SECONDS,
    SenderId,
    template_variables,
)

MAX_BODY_BYTES = MAX_BROADCAST_BYTES
"""Body limit of the broadcast routes (32 MiB: ~400k personalised recipients)."""
MAX_RECIPIENTS = 1_000_000

Number = Annotated[str, msgspec.Meta(max_length=32, description="E.164, e.g. +14155552671")]
VarName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
VarValue = Annotated[str, msgspec.Meta(max_length=256)]
Variables = Annotated[dict[VarName, VarValue], msgspec.Meta(max_length=16)]
BodyText = Annotated[str, msgspec.Meta(
    min_length=1, max_length=1600,
    description="Template: {name} is replaced by the recipient's vars[name]; {{ and }} are "
                "literal braces")]
SenderText = Annotated[str, msgspec.Meta(
    pattern=r"^(\+[1-9][0-9]{6,14}|[A-Za-z0-9 +\-_&]{1,11})$",
    description="E.164 number or alphanumeric sender id")]
ServiceSid = Annotated[str, msgspec.Meta(pattern=r"^MG[0-9a-fA-F]{32}$")]
ExpiresAt = Annotated[datetime, msgspec.Meta(
    tz=True, description="UTC timestamp (with offset): no recipient is sent after it; those "
                         "not sent by then end failed with reason expired")]
ValiditySeconds = Annotated[int, msgspec.Meta(
    ge=1, le=MAX_VALIDITY_SECONDS,
    description="Validity counted from the submission: an alternative to expires_at")]
SendAt = Annotated[datetime, msgspec.Meta(tz=True, description=(
    "Not before this time (RFC 3339 with an offset): the broadcast is stored `scheduled`, "
    "reserved and fanned out from then; the pre-flight's figures are today's. One in the "
    "past goes at once; at most 35 days ahead (else 422 schedule_too_far)"))]

_SENDER: TypeAdapter[str] = TypeAdapter(SenderId)


class Recipient(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One recipient and the values of the template's variables."""

    to: Number
    vars: Variables = msgspec.field(default_factory=dict)


class PreflightIn(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A broadcast to price: the template, the recipients, the STOP footer setting.

    The sender fields may be given (so one body serves the pre-flight and the submission) but
    are not needed here.
    """

    body: BodyText
    recipients: Annotated[list[Recipient], msgspec.Meta(min_length=1, max_length=MAX_RECIPIENTS)]
    footer: bool = False
    from_: SenderText | None = msgspec.field(default=None, name="from")
    messaging_service_sid: ServiceSid | None = None
    priority: Literal["transactional", "bulk"] = "bulk"
    send_at: SendAt | None = None
    expires_at: ExpiresAt | None = None
    validity_seconds: ValiditySeconds | None = None

    def expiry(self, received_at: datetime) -> datetime | None:
        """The absolute UTC expires_at: given, or the validity counted from ``received_at``."""
        if self.validity_seconds is not None:
            return (received_at + timedelta(seconds=self.validity_seconds)).astimezone(UTC)
        return None if self.expires_at is None else self.expires_at.astimezone(UTC)


class BroadcastIn(PreflightIn, forbid_unknown_fields=True, gc=False):
    """A broadcast to send: the pre-flight body with exactly one of the two sender fields."""


Body = TypeVar("Body", PreflightIn, BroadcastIn)
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    PreflightIn: msgspec.json.Decoder(PreflightIn), BroadcastIn: msgspec.json.Decoder(BroadcastIn)}


def _invalid(field: str, message: str, kind: str = "value_error") -> InvalidRequest:
    return InvalidRequest(f"the request body is not valid: {field + ': ' if field else ''}"
                          f"{message}", errors=[
        {"location": "body", "field": field, "message": message, "type": kind}])


def _field_of(message: str) -> str:
    """'Expected `str`, got `int` - at `$.recipients[3].to`' -> 'recipients.3.to'.

    A missing field is named in the message, not the path: 'Object missing required field
    `to` - at `$.recipients[0]`' -> 'recipients.0.to'.
    """
    text, at, where = message.rpartition(" - at `$")
    if not at:
        text, where = message, ""
    path = where.rstrip("`").lstrip(".").replace("[", ".").replace("]", "")
    missing = text.partition("missing required field `")[2]
    if missing:
        path = ".".join(part for part in (path, missing.rstrip("`")) if part)
    return path


def _malformed(raw: bytes, message: str) -> InvalidJson:
    """'JSON is malformed: invalid character (byte 12)' -> where it broke, line and column."""
    reason, _, byte = message.rpartition(" (byte ")
    if not byte.rstrip(")").isdigit():
        return InvalidJson(f"the body is not valid JSON: {message}")
    line, column = position(raw, int(byte.rstrip(")")))
    return invalid_json(reason.removeprefix("JSON is malformed: "), line, column)


def decode(raw: bytes, kind: type[Body]) -> Body:
    """Decode and check a broadcast body; 400 ``invalid_json`` / 422 ``invalid_request``."""
    try:
        with gc_paused():
            body: Body = _DECODERS[kind].decode(raw)
    except msgspec.ValidationError as exc:
        raise _invalid(_field_of(str(exc)), str(exc).partition(" - at `")[0],
                       "validation") from exc
    except msgspec.DecodeError as exc:
        raise _malformed(raw, str(exc)) from exc
    try:
        template_variables(body.body)
    except ValueError as exc:
        raise _invalid("body", str(exc)) from exc
    if body.expires_at is not None and body.validity_seconds is not None:
        raise _invalid("validity_seconds", "at most one of expires_at and validity_seconds")
    if isinstance(body, BroadcastIn):
        _check_sender(body)
    if b"\\u0000" in raw:  # JSON can only carry a NUL escaped; without one, nothing to look for
        _check_text(body)
    return body


def _check_sender(body: BroadcastIn) -> None:
    if (body.from_ is None) == (body.messaging_service_sid is None):
        raise _invalid("from", "exactly one of from and messaging_service_sid is required")
    if body.from_ is not None:
        try:
            _SENDER.validate_python(body.from_)
        except ValidationError as exc:
            raise _invalid("from", "must be an E.164 number or an alphanumeric sender id "
                                   "with at least one letter") from exc


def _check_text(body: PreflightIn | BroadcastIn) -> None:
    """No NUL characters anywhere (PostgreSQL cannot store them)."""
    texts = chain.from_iterable(chain.from_iterable(r.vars.items() for r in body.recipients))
    if "\x00" in body.body or "\x00" in "".join(texts) or "\x00" in "".join(
            r.to for r in body.recipients):
        raise _invalid("recipients", "text must not contain NUL characters")


def columns(body: PreflightIn | BroadcastIn) -> Recipients:
    """The recipients as the pre-flight's index-aligned columns."""
    recipients = body.recipients
    return Recipients([r.to for r in recipients], [r.vars for r in recipients])


def schema_components() -> dict[str, Any]:
    """JSON schemas of the request bodies, for the OpenAPI document."""
    _, components = msgspec.json.schema_components(
        [PreflightIn, BroadcastIn], ref_template="#/components/schemas/{name}")
    return components
