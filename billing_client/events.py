"""Billing events v1: the contract between the dispatcher and the billing service.

The dispatcher emits ``balance.low`` and ``balance.depleted``; the billing service answers with
``credits.granted`` or ``topup.failed``, and tells the owner about its recharge safety rules with
``topup.cap_warning``, ``topup.capped`` and ``topup.disabled``. Each event's routing key on the
billing topic exchange is its ``type``. Delivery is at least once: consumers deduplicate by
``event_id`` (and the dispatcher applies a grant once per ``payment_reference``). Within
``schema_version`` 1 only optional fields and event types are ever added, and decoders ignore
fields they do not know; anything else bumps the version.

An *episode* runs from the balance crossing below the threshold until a grant lifts it back
above; ``balance.low`` is sent once per episode, and replies carry the episode they answer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID, uuid4

import pydantic_core
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 64 * 1024
WIRE_REQUIRED = ("schema_version", "event_id", "occurred_at")
EVENT_TYPES = ("balance.low", "balance.depleted", "credits.granted", "topup.failed",
               "topup.cap_warning", "topup.capped", "topup.disabled")
# Known values of the open code fields below; consumers must accept others.
PAYMENT_METHODS = ("primary", "backup", "manual")
TOPUP_FAILURE_REASONS = ("declined", "insufficient_funds", "expired_card", "timeout",
                         "gateway_error", "no_payment_method", "limit_exceeded",
                         "monthly_cap", "auto_recharge_paused")
# What a monthly recharge cap counts: credits granted, or money charged.
CAP_UNITS = ("credits", "money")

AccountId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Code = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Credits = Annotated[int, Field(ge=0)]
Episode = Annotated[int, Field(ge=1)]
# Not Literal[1]: pydantic lets ``true`` and ``1.0`` through a literal even in strict mode.
Version = Annotated[int, Field(ge=1, le=1), WithJsonSchema({"type": "integer", "const": 1})]


class BillingClientError(Exception):
    """Billing client error."""

    code = "billing_client_error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.code).strip())


class InvalidEvent(BillingClientError):
    """The billing event does not follow the billing contract."""

    code = "invalid_event"

    def __init__(self, detail: str, *, reason: str = "invalid_field") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _now() -> datetime:
    return datetime.now(UTC)


class _Event(BaseModel):
    """Fields every billing event has."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True,
                              json_schema_serialization_defaults_required=True)

    schema_version: Version = 1
    type: str
    event_id: UUID = Field(default_factory=uuid4)
    occurred_at: AwareDatetime = Field(default_factory=_now)
    account: AccountId

    @property
    def routing_key(self) -> str:
        """The routing key on the billing exchange: the event type."""
        return self.type


class AutoRecharge(BaseModel):
    """An account's auto-recharge settings: below ``threshold``, add ``amount`` credits.
    ``changed_at``: when an owner last changed them (null: never since the account was made)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True,
                              json_schema_serialization_defaults_required=True)

    enabled: bool
    threshold: Credits
    amount: Credits
    changed_at: AwareDatetime | None = None


class BalanceForecast(BaseModel):
    """How urgent a low balance is: the net credits spent in the last ``window_seconds`` and,
    at that rate, the seconds until available credits reach zero (0: already there; null: no
    spend in the window, so no forecast)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True,
                              json_schema_serialization_defaults_required=True)

    window_seconds: Annotated[int, Field(gt=0)] = 3600
    spent: Credits
    seconds_to_zero: Credits | None = None


class BalanceLow(_Event):
    """Available credits fell below the threshold, or to zero or below (once per episode).

    ``shortfall`` is what it takes to reach the threshold again (threshold - available).
    ``topup_requested_even_if_disabled``: auto-recharge is off but the balance is at zero or
    below and the account did not opt out, so a top-up with the saved settings is wanted.
    """

    type: Literal["balance.low"] = "balance.low"
    available: int
    threshold: Credits
    auto_recharge: AutoRecharge
    episode: Episode
    shortfall: Credits | None = None
    topup_requested_even_if_disabled: bool = False
    forecast: BalanceForecast | None = None
    held_jobs: Credits | None = None
    held_credits: Credits | None = None


class BalanceDepleted(_Event):
    """A job was held for lack of credits; a top-up is wanted even if auto-recharge is off."""

    type: Literal["balance.depleted"] = "balance.depleted"
    available: int
    held_jobs: Credits
    held_credits: Credits
    episode: Episode
    auto_recharge: AutoRecharge
    topup_requested_even_if_disabled: bool
    forecast: BalanceForecast | None = None


class CreditsGranted(_Event):
    """Credits were added; the dispatcher applies each ``payment_reference`` exactly once."""

    type: Literal["credits.granted"] = "credits.granted"
    amount: Annotated[int, Field(gt=0)]
    kind: Literal["auto_recharge", "purchase", "adjustment"]
    payment_reference: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:/-]{1,128}$")]
    payment_method: Code | None = None
    episode: Episode | None = None
    in_reply_to: UUID | None = None


class TopupFailed(_Event):
    """A top-up charge failed; ``next_attempt_at`` is null when the billing service gave up."""

    type: Literal["topup.failed"] = "topup.failed"
    attempts: Annotated[int, Field(ge=1)]
    reason: Code
    advice: Annotated[str, StringConstraints(max_length=500)] = ""
    next_attempt_at: AwareDatetime | None = None
    amount: Credits | None = None
    payment_method: Code | None = None
    episode: Episode | None = None
    in_reply_to: UUID | None = None


Month = Annotated[str, StringConstraints(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$")]
Money = Annotated[int, Field(gt=0)]


class TopupCapWarning(_Event):
    """This calendar month's automatic charges reached ``percent`` (80, then 90) of the cap."""

    type: Literal["topup.cap_warning"] = "topup.cap_warning"
    percent: Annotated[int, Field(ge=1, le=99)]
    month: Month
    unit: Code
    cap: Money
    used: Credits


class TopupCapped(_Event):
    """The monthly recharge cap is reached (or the next charge would pass it): no automatic
    charge until ``resets_at`` (the next calendar month, UTC) or until an owner raises it."""

    type: Literal["topup.capped"] = "topup.capped"
    month: Month
    unit: Code
    cap: Money
    used: Credits
    refused_amount: Credits | None = None
    resets_at: AwareDatetime
    episode: Episode | None = None


class DeclinedCharge(BaseModel):
    """One declined charge of the run that paused auto-recharge."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True,
                              json_schema_serialization_defaults_required=True)

    reason: Code
    payment_method: Code | None = None
    at: AwareDatetime


class TopupDisabled(_Event):
    """Auto-recharge turned itself off after ``declines`` consecutive declined charges (primary
    and backup alike); it stays off until an owner turns it back on."""

    type: Literal["topup.disabled"] = "topup.disabled"
    reason: Code = "consecutive_declines"
    declines: Annotated[int, Field(ge=1)]
    decline_reasons: Annotated[list[DeclinedCharge], Field(max_length=50)]
    advice: Annotated[str, StringConstraints(max_length=500)] = ""
    # The ``auto_recharge.changed_at`` billing last saw: the dispatcher turns auto-recharge off
    # only if no owner changed the settings since; a later change turns billing's pause off.
    settings_changed_at: AwareDatetime | None = None


BillingEvent = (BalanceLow | BalanceDepleted | CreditsGranted | TopupFailed | TopupCapWarning
                | TopupCapped | TopupDisabled)
_EVENTS: TypeAdapter[BillingEvent] = TypeAdapter(
    Annotated[BillingEvent, Field(discriminator="type")])


def encode_event(event: BillingEvent) -> bytes:
    """The wire form of an event (JSON, UTF-8)."""
    return event.model_dump_json().encode()


def decode_event(raw: bytes, *, max_bytes: int = MAX_EVENT_BYTES) -> BillingEvent:
    """Validate one billing event. Raises ``InvalidEvent`` with a reason code."""
    if len(raw) > max_bytes:
        raise InvalidEvent(f"{len(raw)} bytes is over the {max_bytes}-byte limit",
                           reason="too_large")
    try:
        event = _EVENTS.validate_json(raw)
    except ValidationError as exc:
        raise _invalid(raw, exc) from None
    # Defaults are for building events in Python; a decoded event must carry its own id.
    missing = [key for key in WIRE_REQUIRED if key not in event.model_fields_set]
    if missing:
        raise InvalidEvent(f"{', '.join(missing)}: field required")
    return event


def _invalid(raw: bytes, exc: ValidationError) -> InvalidEvent:
    """One reason code (``not_json``, ``unsupported_version``, ``unknown_type``, ...)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]["type"]
    if first == "json_invalid":
        return InvalidEvent(errors[0]["msg"], reason="not_json")
    envelope: Any = pydantic_core.from_json(raw)
    if not isinstance(envelope, dict):
        return InvalidEvent("an event must be a JSON object")
    version = envelope.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        return InvalidEvent(f"schema_version must be {SCHEMA_VERSION}",
                            reason="unsupported_version")
    if first in ("union_tag_invalid", "union_tag_not_found"):
        return InvalidEvent(f"type must be one of: {', '.join(EVENT_TYPES)}",
                            reason="unknown_type")
    paths = [".".join(str(part) for part in e["loc"][1:]) for e in errors[:5]]
    detail = "; ".join((f"{path}: " if path else "") + e["msg"].removeprefix("Value error, ")
                       for path, e in zip(paths, errors, strict=False))
    return InvalidEvent(detail)
