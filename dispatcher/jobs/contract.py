"""Job contract v1: what publishers send, the status events and dead letters they get back.

Jobs are UTF-8 JSON objects, one per AMQP message, discriminated by ``kind``, versioned by
``schema_version``; the publisher-chosen ``id`` is the idempotency key. Jobs are strict (unknown
fields rejected); events we emit ignore unknown fields, so optional fields may be added within v1.
Recipients follow one rule (``canonical_number``): '+' and digits that libphonenumber calls
valid, by its own length rules, turned into canonical E.164 (a trunk prefix after the country
code is dropped). A job's ``to`` is checked and canonicalised here; broadcast recipients are only
checked for that *form* (a regex: 100k parse in ~0.2 s) and the pre-flight, applying the same
rule, skips invalid numbers one by one.
JSON that parsers read differently is refused before validation: a key twice in one object
(``duplicate_key``: one parser keeps the first, ours the last), and text PostgreSQL cannot store
(``invalid_text``: a NUL character or a lone UTF-16 surrogate, which only ``\\u`` escapes can
carry).
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal, NotRequired, Self, TypeVar, get_args
from urllib.parse import urlsplit
from uuid import UUID

import pydantic_core
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from dispatcher.errors import DispatcherError
from dispatcher.pricing.numbers import canonical_number
from dispatcher.pricing.templates import STOP_FOOTER

SCHEMA_VERSION = 1
# How far ahead ``send_at`` may be: a job scheduled later is refused (``schedule_too_far``).
MAX_SCHEDULE_AHEAD = timedelta(days=35)
MAX_JOB_BYTES = 256 * 1024
MAX_BROADCAST_BYTES = 32 * 1024 * 1024

JobKind = Literal["sms", "call", "broadcast", "cancel"]
Priority = Literal["transactional", "bulk"]
ReasonCode = Literal["too_large", "not_utf8", "not_json", "unsupported_version", "unknown_kind",
                     "invalid_field", "invalid_recipient", "invalid_text", "duplicate_key"]
# Refusals of jobs the contract accepted (see ``routing_mismatch`` and ``begin_job``).
ROUTING_MISMATCH: Final = "routing_mismatch"
REASON_CODES: tuple[ReasonCode, ...] = get_args(ReasonCode)
JobStatus = Literal["scheduled", "deferred", "held", "sent", "delivered", "undelivered",
                    "failed", "unknown", "canceled", "skipped", "dead_lettered"]
ROUTING_KEYS = tuple(f"{k}.{p}" for k in ("sms", "call", "broadcast", "cancel")
                     for p in ("transactional", "bulk"))

ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
ACCOUNT_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
E164_PATTERN = r"^\+[1-9][0-9]{6,14}$"  # senders (``from``)
NUMBER_PATTERN = r"^\+[0-9]{3,31}$"  # the form a recipient is written in (see canonical_number)
CODE_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
_E164 = re.compile(E164_PATTERN)
_ALPHA_SENDER = re.compile(r"^[A-Za-z0-9 +\-_&]{1,11}$")
_SNIFF = {"job_id": re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_.:-]{1,128})"'),
          "account": re.compile(rb'"account"\s*:\s*"([A-Za-z0-9_.:-]{1,64})"')}
# What PostgreSQL refuses in text and jsonb: NUL, and UTF-16 surrogates not in a valid pair
# (Python's json joins valid pairs, so any surrogate left in a decoded string is a lone one).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]{0,63})\}|[{}]")


class InvalidJob(DispatcherError):
    """The job does not follow the job contract."""

    code = "invalid_job"

    def __init__(self, reason: ReasonCode, detail: str, *, job_id: str | None = None,
                 account: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}", reason=reason, job_id=job_id, account=account)
        self.reason, self.detail, self.job_id, self.account = reason, detail, job_id, account


def _phone_number(value: str, info: ValidationInfo) -> str:
    """A valid number (``canonical_number``, the one rule), in canonical E.164 form."""
    if isinstance(info.context, dict) and info.context.get("stored") is True:
        return value  # checked on the way in, before it was stored
    canonical = canonical_number(value)
    if canonical is None:
        raise ValueError("not a valid E.164 phone number (e.g. +14155552671)")
    return canonical


def _sender_id(value: str) -> str:
    """An E.164 number or an alphanumeric sender id (≤ 11 chars, at least one letter)."""
    if _E164.match(value) or (_ALPHA_SENDER.match(value) and any(map(str.isalpha, value))):
        return value
    raise ValueError("must be an E.164 number or an alphanumeric sender id (1-11 characters "
                     "of A-Z a-z 0-9 space + - _ &, at least one letter)")


def _utc(value: datetime) -> datetime:
    """An aware timestamp, in UTC (one canonical form for the job's fingerprint)."""
    return value.astimezone(UTC)


def _http_url(value: str) -> str:
    """An absolute http(s) URL."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http or https URL")
    return value


def template_variables(template: str) -> frozenset[str]:
    """The ``{name}`` placeholders of a body template; ``{{`` and ``}}`` are literal braces."""
    matches = list(_PLACEHOLDER.finditer(template))
    if any(match.group(0) in ("{", "}") for match in matches):
        raise ValueError("unbalanced brace: write {{ or }} for a literal brace")
    return frozenset(match.group(1) for match in matches if match.group(1))


def render_template(template: str, variables: Mapping[str, str]) -> str:
    """Fill a body template's placeholders from ``variables`` (all must be present)."""
    def fill(match: re.Match[str]) -> str:
        token = match.group(0)
        return token[0] if token in ("{{", "}}") else variables[match.group(1)]
    return _PLACEHOLDER.sub(fill, template)


JobId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
AccountId = Annotated[str, StringConstraints(pattern=ACCOUNT_PATTERN)]
PhoneNumber = Annotated[str, AfterValidator(_phone_number), WithJsonSchema(
    {"type": "string", "pattern": NUMBER_PATTERN, "description": (
        "E.164, valid per libphonenumber; a national trunk prefix after the country code is "
        "dropped (+920300… is +92300…)")})]
NumberForm = Annotated[str, StringConstraints(pattern=NUMBER_PATTERN)]
E164Format = Annotated[str, StringConstraints(pattern=E164_PATTERN)]
SenderId = Annotated[str, AfterValidator(_sender_id), WithJsonSchema({"type": "string", "pattern": (
    r"^(\+[1-9][0-9]{6,14}|[A-Za-z0-9 +\-_&]{1,11})$"), "description": "E.164 or sender id"})]
MessagingServiceSid = Annotated[str, StringConstraints(pattern=r"^MG[0-9a-fA-F]{32}$")]
Body = Annotated[str, StringConstraints(min_length=1, max_length=1600)]
ShortText = Annotated[str, StringConstraints(max_length=256)]
Metadata = Annotated[dict[Annotated[str, StringConstraints(min_length=1, max_length=64)],
                          ShortText], Field(max_length=16)]
Code = Annotated[str, StringConstraints(pattern=CODE_PATTERN)]
SendAt = Annotated[AwareDatetime, AfterValidator(_utc), WithJsonSchema({
    "type": "string", "format": "date-time", "description": (
        "Not before this time (UTC; an offset is converted): the job is accepted at once, "
        "`scheduled`, and reserved and sent at its time; one in the past goes at once; at "
        "most 35 days ahead (else refused: schedule_too_far)")})]
# Not Literal[1]: pydantic lets ``true`` and ``1.0`` through a literal even in strict mode.
Version = Annotated[int, Field(ge=1, le=1), WithJsonSchema({"type": "integer", "const": 1})]
MAX_VALIDITY_SECONDS = 30 * 24 * 3600
ValiditySeconds = Annotated[int, Field(ge=1, le=MAX_VALIDITY_SECONDS)]


class _Job(BaseModel):
    """Fields every job kind has; strict types, unknown fields rejected, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)

    schema_version: Version
    id: JobId
    kind: JobKind
    account: AccountId
    metadata: Metadata = Field(default_factory=dict)
    created_at: AwareDatetime | None = None


class _TimedJob(_Job):
    """A job that sends something, and so may have a validity."""

    # Validity (issue 16): never sent after ``expires_at``. ``validity_seconds`` is turned into
    # an ``expires_at`` when the job is received (``with_expiry``); the stored job has both.
    expires_at: AwareDatetime | None = None
    validity_seconds: ValiditySeconds | None = None

    @model_validator(mode="after")
    def _one_validity(self, info: ValidationInfo) -> Self:
        stored = isinstance(info.context, dict) and info.context.get("stored") is True
        if not stored and self.expires_at is not None and self.validity_seconds is not None:
            raise ValueError("expires_at, validity_seconds: at most one of them")
        return self


class _MessagingJob(_TimedJob):
    """A job sent from a number / sender id, or through a Messaging Service."""

    from_: SenderId | None = Field(None, validation_alias="from", serialization_alias="from")
    messaging_service_sid: MessagingServiceSid | None = None

    @model_validator(mode="after")
    def _one_sender(self) -> Self:
        if (self.from_ is None) == (self.messaging_service_sid is None):
            raise ValueError("from, messaging_service_sid: exactly one of them is required")
        return self


class SmsJob(_MessagingJob):
    """One text message to one recipient."""

    kind: Literal["sms"]
    to: PhoneNumber
    body: Body
    priority: Priority = "transactional"
    send_at: SendAt | None = None


class CallJob(_TimedJob):
    """One voice call, driven by inline TwiML or a TwiML URL."""

    kind: Literal["call"]
    to: PhoneNumber
    from_: E164Format = Field(validation_alias="from", serialization_alias="from")
    twiml: Annotated[str, StringConstraints(min_length=1, max_length=4000)] | None = None
    url: Annotated[str, StringConstraints(max_length=2048), AfterValidator(_http_url)] | None = None
    max_minutes: Annotated[int, Field(ge=1, le=240)]
    priority: Priority = "transactional"
    send_at: SendAt | None = None

    @model_validator(mode="after")
    def _one_script(self) -> Self:
        if (self.twiml is None) == (self.url is None):
            raise ValueError("twiml, url: exactly one of them is required")
        return self


# A plain dict, not a model: 100k model instances parse several times slower (mostly GC).
@with_config(ConfigDict(strict=True, extra="forbid"))
class Recipient(TypedDict):
    """One broadcast recipient and the values of the body's ``{variables}``."""

    to: NumberForm
    vars: NotRequired[Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                                     ShortText], Field(max_length=16)]]


class BroadcastJob(_MessagingJob):
    """One templated message to many recipients (up to a million)."""

    kind: Literal["broadcast"]
    body: Body
    recipients: Annotated[list[Recipient], Field(min_length=1, max_length=1_000_000)]
    footer: bool = False
    priority: Priority = "bulk"
    send_at: SendAt | None = None

    @field_validator("body")
    @classmethod
    def _template(cls, body: str) -> str:
        template_variables(body)
        return body

    @model_validator(mode="after")
    def _variables_supplied(self) -> Self:
        needed = template_variables(self.body)
        for index, recipient in enumerate(self.recipients):
            for name in needed:
                if name not in recipient.get("vars", ()):
                    raise ValueError(f"recipients[{index}].vars: missing {name!r} used in body")
        return self

    def render(self, recipient: Recipient) -> str:
        """The text this recipient gets: the template filled in, plus the STOP footer if asked."""
        text = render_template(self.body, recipient.get("vars", {}))
        return text + STOP_FOOTER if self.footer else text


class CancelJob(_Job):
    """Cancel a scheduled or deferred job, or a broadcast, of the same account before it goes."""

    kind: Literal["cancel"]
    target: JobId
    priority: Priority = "transactional"


Job = SmsJob | CallJob | BroadcastJob | CancelJob
_JOBS: TypeAdapter[Job] = TypeAdapter(Annotated[Job, Field(discriminator="kind")])
# Contract field names may be echoed in a detail; other keys (metadata, vars) are content.
_FIELD_NAMES = frozenset({"to", "vars"}.union(
    *({f.validation_alias if isinstance(f.validation_alias, str) else name
       for name, f in model.model_fields.items()}
      for model in (SmsJob, CallJob, BroadcastJob, CancelJob))))


def job_fingerprint(job: Job) -> str:
    """SHA-256 of the job's canonical content: what ``encode_job`` writes, less ``created_at``
    (the publisher helper stamps it on each publish, so a republished job keeps its print) and
    less an ``expires_at`` derived from ``validity_seconds`` (counted from that stamp)."""
    derived = {"expires_at"} if getattr(job, "validity_seconds", None) is not None else set()
    canonical = job.model_dump_json(by_alias=True, exclude_none=True,
                                    exclude={"created_at", *derived})
    return hashlib.sha256(canonical.encode()).hexdigest()


AnyJob = TypeVar("AnyJob", bound=_TimedJob)


def with_expiry(job: AnyJob, received_at: datetime) -> AnyJob:
    """The job with its validity as an absolute UTC ``expires_at``: ``validity_seconds`` is
    counted from ``created_at``, else from ``received_at``; None stays None (no expiry)."""
    expires_at = job.expires_at
    if expires_at is None and job.validity_seconds is not None:
        expires_at = (job.created_at or received_at) + timedelta(seconds=job.validity_seconds)
    if expires_at is None or (expires_at == job.expires_at
                              and expires_at.utcoffset() == timedelta(0)):
        return job
    return job.model_copy(update={"expires_at": expires_at.astimezone(UTC)})


def routing_key(job: Job) -> str:
    """``<kind>.<priority>``, the routing key on the ``<prefix>.jobs`` topic exchange."""
    return f"{job.kind}.{job.priority}"


@dataclass(frozen=True, slots=True)
class Arrival:
    """How a job reached the dispatcher: the routing key it was published with on
    ``<prefix>.jobs`` (None when it came another way, e.g. back from a retry queue) and the
    priority of the work queue it was consumed from."""

    routing_key: str | None
    queue_priority: Priority


def routing_mismatch(job: Job, arrival: Arrival) -> str | None:
    """The one routing rule: a job published on ``<prefix>.jobs`` must carry its own
    ``<kind>.<priority>`` as routing key, and every job must come off the work queue of its own
    priority. Why it does not (no job content echoed), or None when it does."""
    own = routing_key(job)
    if arrival.routing_key is not None and arrival.routing_key != own:
        return (f"published with routing key {arrival.routing_key[:64]!r}, but the job is "
                f"{own!r} (<kind>.<priority>)")
    if arrival.queue_priority != job.priority:
        return (f"consumed from the {arrival.queue_priority} queue, but the job's priority is "
                f"{job.priority!r}")
    return None


def encode_job(job: Job | Mapping[str, Any]) -> bytes:
    """The wire form of a job model (aliases such as ``from``, no nulls), or of a dict as is."""
    if isinstance(job, SmsJob | CallJob | BroadcastJob | CancelJob):
        return job.model_dump_json(by_alias=True, exclude_none=True).encode()
    try:
        return pydantic_core.to_json(job)
    except pydantic_core.PydanticSerializationError:
        raise InvalidJob("not_json", "the job holds values JSON cannot represent") from None


def parse_job(raw: bytes, *, max_bytes: int = MAX_JOB_BYTES,
              max_broadcast_bytes: int = MAX_BROADCAST_BYTES) -> Job:
    """Validate one raw job; the size is checked before any parsing. Raises ``InvalidJob``."""
    size = len(raw)
    if size > max_bytes and (size > max_broadcast_bytes or b'"broadcast"' not in raw):
        # Only a broadcast may be bigger; anything else is refused without being parsed.
        raise InvalidJob("too_large", f"{size} bytes is over the limit ({max_bytes} bytes, "
                         f"{max_broadcast_bytes} for a broadcast)", **sniff_ids(raw))
    _refuse_ambiguous(raw)
    try:
        job = _JOBS.validate_json(raw, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise _invalid(raw, exc) from None
    limit = max_broadcast_bytes if job.kind == "broadcast" else max_bytes
    if size > limit:
        raise InvalidJob("too_large", f"{size} bytes is over the {limit}-byte limit for "
                         f"{job.kind}", job_id=job.id, account=job.account)
    return job


class _Ambiguous(ValueError):
    """JSON that is well-formed but read differently by different parsers, or unstorable."""

    def __init__(self, reason: ReasonCode, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _refuse_ambiguous(raw: bytes) -> None:
    """Raise ``InvalidJob`` for duplicate keys (any depth) and unstorable text; leave anything
    that is not UTF-8 JSON to the validator, which names the problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    escaped = "\\u" in text  # NUL and surrogates can only arrive as \u escapes

    def unstorable(value: object) -> bool:
        if isinstance(value, str):
            return _UNSTORABLE.search(value) is not None
        return isinstance(value, list) and any(unstorable(item) for item in value)

    def object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            shown = repr(key) if key in _FIELD_NAMES else "a key"
            raise _Ambiguous("duplicate_key", f"{shown} appears twice in one object")
        if escaped and any(unstorable(k) or unstorable(v) for k, v in pairs):
            raise _Ambiguous("invalid_text", "text holds a NUL character or a lone UTF-16 "
                             "surrogate (\\u0000, \\ud800-\\udfff), which cannot be stored")
        return obj

    collecting = gc.isenabled()
    gc.disable()  # a 100k-recipient broadcast makes 200k dicts: most of the time went to GC
    try:
        document = json.loads(text, object_pairs_hook=object_pairs)
    except _Ambiguous as exc:
        raise InvalidJob(exc.reason, exc.detail, **sniff_ids(raw)) from None
    except ValueError:
        return
    finally:
        if collecting:
            gc.enable()
    if escaped and unstorable(document):
        raise InvalidJob("invalid_text", "text holds a NUL character or a lone UTF-16 surrogate",
                         **sniff_ids(raw))


# Validation context of payloads we stored ourselves after parse_job had accepted them.
STORED: Final = {"stored": True}


def decode_stored_job(payload: bytes) -> SmsJob | CallJob:
    """A job payload from our own jobs table: already validated, so the costly phone-number
    check is not run again (everything else is, so a corrupt row still fails loudly)."""
    try:
        job = _JOBS.validate_json(payload, by_alias=True, by_name=False, context=STORED)
    except ValidationError as exc:
        raise _invalid(payload, exc) from None
    if not isinstance(job, SmsJob | CallJob):
        raise InvalidJob("unknown_kind", f"a stored {job.kind} job cannot be sent",
                         job_id=job.id, account=job.account)
    return job


def validate_job(data: Job | Mapping[str, Any], **limits: int) -> Job:
    """Validate a job given as a dict in wire form (``from``, not ``from_``), or re-check one."""
    return parse_job(encode_job(data), **limits)


def sniff_ids(raw: bytes) -> dict[str, str | None]:
    """Best effort ``id``/``account`` from the start of a job that cannot be parsed."""
    matches = {field: pattern.search(raw, 0, 65536) for field, pattern in _SNIFF.items()}
    return {field: m.group(1).decode() if m else None for field, m in matches.items()}


def _envelope_ids(envelope: object) -> dict[str, str | None]:
    """``id``/``account`` of a parsed but invalid job, when they are themselves valid."""
    fields = envelope if isinstance(envelope, dict) else {}
    found = {"job_id": (fields.get("id"), ID_PATTERN),
             "account": (fields.get("account"), ACCOUNT_PATTERN)}
    return {key: value if isinstance(value, str) and re.match(pattern, value) else None
            for key, (value, pattern) in found.items()}


def _invalid(raw: bytes, exc: ValidationError) -> InvalidJob:
    """Turn a validation failure into one reason code and a detail that echoes no content."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if errors[0]["type"] == "json_invalid":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return InvalidJob("not_utf8", f"invalid UTF-8 at byte {bad.start}", **sniff_ids(raw))
        return InvalidJob("not_json", errors[0]["msg"], **sniff_ids(raw))
    envelope = pydantic_core.from_json(raw)
    reason, detail = _classify(envelope, errors)
    return InvalidJob(reason, detail, **_envelope_ids(envelope))


def _classify(envelope: object, errors: list[Any]) -> tuple[ReasonCode, str]:
    """The reason code for a JSON document that is not a valid v1 job."""
    if not isinstance(envelope, dict):
        return "invalid_field", "a job must be a JSON object"
    version = envelope.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        return "unsupported_version", f"schema_version must be {SCHEMA_VERSION}"
    if errors[0]["type"] == "union_tag_not_found":
        return "invalid_field", "kind: field required (sms, call, broadcast or cancel)"
    if errors[0]["type"] == "union_tag_invalid":
        return "unknown_kind", "kind must be one of: sms, call, broadcast, cancel"
    paths = [_path(e["loc"][1:]) for e in errors]
    messages = [(f"{p}: " if p else "") + e["msg"].removeprefix("Value error, ")
                for p, e in zip(paths, errors, strict=True)]
    more = f"; and {len(messages) - 5} more" if len(messages) > 5 else ""
    detail = "; ".join(messages[:5]) + more
    on_numbers = all(re.fullmatch(r"to|recipients\[\d+\]\.to", p) for p in paths)
    return ("invalid_recipient" if on_numbers else "invalid_field"), detail


def _path(loc: tuple[int | str, ...]) -> str:
    """``recipients[3].to`` from ``('recipients', 3, 'to')``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text[:120]


class _Event(BaseModel):
    """Events we emit: strict types, immutable, unknown (newer optional) fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True,
                              json_schema_serialization_defaults_required=True)


class StatusEvent(_Event):
    """A job's status change, published on ``<prefix>.events`` as ``status.<kind>.<status>``."""

    schema_version: Version = 1
    event_id: UUID
    job_id: JobId
    account: AccountId
    kind: JobKind
    status: JobStatus
    reason: Code | None = None
    provider_sid: Annotated[str, StringConstraints(max_length=64)] | None = None
    broadcast_id: JobId | None = None
    segments: Annotated[int, Field(ge=0)] | None = None
    credits: int | None = None
    metadata: Metadata = Field(default_factory=dict)
    occurred_at: AwareDatetime

    @property
    def routing_key(self) -> str:
        """``status.<kind>.<status>``."""
        return f"status.{self.kind}.{self.status}"


class OriginalMessage(_Event):
    """What is known of the dead-lettered AMQP message (never its content)."""

    message_id: Annotated[str, StringConstraints(max_length=256)] | None = None
    routing_key: Annotated[str, StringConstraints(max_length=256)] | None = None
    type: Annotated[str, StringConstraints(max_length=64)] | None = None
    body_bytes: Annotated[int, Field(ge=0)] = 0


class DeadLetter(_Event):
    """Why a job was parked on ``<prefix>.dead``; carried in headers of the original message."""

    schema_version: Version = 1
    reason: Code
    detail: Annotated[str, StringConstraints(max_length=500)] = ""
    job_id: JobId | None = None
    account: AccountId | None = None
    original: OriginalMessage = Field(default_factory=OriginalMessage)

    def to_headers(self) -> dict[str, str]:
        """The ``x-reason``/``x-detail``/``x-job-id``/``x-account`` headers."""
        headers = {"x-reason": self.reason, "x-detail": self.detail, "x-job-id": self.job_id,
                   "x-account": self.account}
        return {key: value for key, value in headers.items() if value is not None}

    @classmethod
    def from_headers(cls, headers: Mapping[str, object], original: OriginalMessage) -> Self:
        """Read a dead letter back; a delivery-limit dead letter has only its routing key."""
        def text(key: str) -> str | None:
            value = headers.get(key)
            return value.decode() if isinstance(value, bytes) else value if isinstance(
                value, str) else None
        return cls(reason=text("x-reason") or original.routing_key or "unknown",
                   detail=text("x-detail") or "", job_id=text("x-job-id"),
                   account=text("x-account"), original=original)


def schedule_too_far(send_at: datetime | None, now: datetime) -> str | None:
    """Why ``send_at`` is refused (beyond ``MAX_SCHEDULE_AHEAD`` from ``now``), or None."""
    if send_at is None or send_at - now <= MAX_SCHEDULE_AHEAD:
        return None
    return (f"send_at is more than {MAX_SCHEDULE_AHEAD.days} days ahead "
            f"(at most {(now + MAX_SCHEDULE_AHEAD).isoformat()})")
