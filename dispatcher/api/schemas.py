"""Request and response bodies of the HTTP API; the OpenAPI document is generated from these."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_CREDITS = 10**12
ACCOUNT_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
# A phone number's form: '+' and digits. Validity and the canonical E.164 form are decided by
# the one rule, ``canonical_number`` (a trunk prefix after the country code is dropped).
E164_PATTERN = r"^\+[0-9]{3,31}$"


def _plain_text(value: str) -> str:
    """Text PostgreSQL can store: no NUL characters, no lone surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text") from exc
    return value


Credits = Annotated[int, Field(ge=0, le=MAX_CREDITS)]
PositiveCredits = Annotated[int, Field(ge=1, le=MAX_CREDITS)]
Note = Annotated[str, Field(max_length=500, pattern=r"^[^\x00]*$"), AfterValidator(_plain_text)]
Reference = Annotated[str, Field(min_length=1, max_length=400, pattern=r"^[^\x00]+$"),
                      AfterValidator(_plain_text)]


class RequestBody(BaseModel):
    """Request bodies: strict types, no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


class ResponseBody(BaseModel):
    """Response bodies: every field always present."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


class AutoRecharge(ResponseBody):
    """Auto-recharge settings: below ``threshold`` available credits, buy ``amount`` more."""

    enabled: bool
    threshold: int
    amount: int
    topup_at_zero: bool = Field(
        description="Request a top-up at zero credits even when auto-recharge is disabled")


class AutoRechargeUpdate(RequestBody):
    """New auto-recharge settings; ``topup_at_zero`` is kept when omitted. Enabled, ``amount``
    must be greater than ``threshold`` (one top-up from zero lifts the balance above it)."""

    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"enabled": {"const": True}}},
        "then": {"properties": {"amount": {"minimum": 1}}},
    })

    enabled: bool
    threshold: Credits
    amount: Credits
    topup_at_zero: bool | None = None

    @field_validator("amount")
    @classmethod
    def _amount_when_enabled(cls, amount: int, info: ValidationInfo) -> int:
        if info.data.get("enabled") and amount <= 0:
            raise ValueError("amount must be > 0 when auto-recharge is enabled")
        threshold = info.data.get("threshold")
        if info.data.get("enabled") and isinstance(threshold, int) and amount <= threshold:
            raise ValueError(f"amount ({amount}) must be greater than threshold ({threshold}) "
                             "when auto-recharge is enabled: one top-up from zero must lift "
                             "the balance above the threshold, or it would charge again and "
                             "again")
        return amount


class MessagingSettings(ResponseBody):
    """How the account's messages are sent."""

    smart_encoding: bool = Field(description=(
        "Twilio Smart Encoding, done by the dispatcher: look-alike Unicode characters (curly "
        "quotes, long dashes, no-break spaces, ellipsis…) are replaced by GSM-7 ones before "
        "pricing and sending, so the text priced is the text sent. Off by default."))


class MessagingSettingsUpdate(RequestBody):
    """New messaging settings."""

    smart_encoding: bool


class Buckets(ResponseBody):
    """Credits by bucket: subscription (reset each period), purchased (roll over), debt."""

    subscription: int
    purchased: int
    debt: int


CountryCode = Annotated[str, Field(pattern=r"^[A-Z]{2}$")]


class SpendGuardsUpdate(RequestBody):
    """New spend guards: every field replaces the current one; null (or absent) turns it off.

    All are checked in the same transaction as each reservation, so they hold exactly, across
    replicas and concurrent batches.
    """

    daily_spend_cap: Credits | None = Field(default=None, description=(
        "credits that may be reserved per UTC day (00:00 to 24:00 UTC, whatever the account's "
        "time zone); a job that would pass it is held with reason daily_cap until the next UTC "
        "day (account.capped, account.uncapped). A reservation given back later (a failed "
        "send) still counts"))
    allowed_countries: list[CountryCode] | None = Field(default=None, max_length=300,
                                                       description=(
        "ISO 3166-1 alpha-2 codes; a recipient elsewhere (or of unknown country) is refused "
        "with country_not_allowed: a single job is dead-lettered, a broadcast recipient "
        "skipped; never reserved, never charged. null: every country"))
    max_credits_per_message: PositiveCredits | None = Field(default=None, description=(
        "a message priced above it is refused with price_above_limit before anything is "
        "reserved"))
    velocity_window_seconds: Annotated[int, Field(ge=10, le=86400)] | None = Field(
        default=None, description=(
            "the velocity guard's window; with velocity_multiple, bulk sending is held (reason "
            "velocity, account.velocity_held) when the credits reserved in the current window "
            "would pass max(velocity_multiple x the usual credits per window, "
            "velocity_min_credits); an owner releases it (POST …/spend-guards/release-velocity)"))
    velocity_multiple: Annotated[float, Field(gt=1, le=1000)] | None = None
    velocity_min_credits: Credits = Field(default=100, description=(
        "the velocity threshold never goes below this (a new or quiet account)"))
    transactional_reserve: Credits = Field(default=0, description=(
        "bulk work may not spend the last N credits (it is held and the account paused, as "
        "at zero); transactional jobs may"))
    transactional_overdraft: Credits = Field(default=0, description=(
        "transactional jobs may also take the balance below zero, down to -N (the part "
        "beyond the credits is debt, given back if the send fails)"))

    @model_validator(mode="after")
    def _velocity_both_or_neither(self) -> SpendGuardsUpdate:
        if (self.velocity_multiple is None) != (self.velocity_window_seconds is None):
            raise ValueError("velocity_window_seconds and velocity_multiple go together")
        return self


class SpendGuards(ResponseBody):
    """An account's spend guards and where it stands today (UTC)."""

    daily_spend_cap: int | None
    allowed_countries: list[str] | None
    max_credits_per_message: int | None
    velocity_window_seconds: int | None
    velocity_multiple: float | None
    velocity_min_credits: int
    transactional_reserve: int
    transactional_overdraft: int
    spent_today: int = Field(description="credits reserved today (UTC) toward the daily cap")
    remaining_today: int | None = Field(description="what the daily cap still allows today")
    capped_until: datetime | None = Field(
        description="while the daily cap holds jobs: when they go (the next UTC day)")
    velocity_held_since: datetime | None = Field(
        description="while the velocity guard holds bulk sending: since when")


class VelocityReleased(ResponseBody):
    """Whether a velocity hold was ended (false: there was none)."""

    released: bool


class BalanceOut(ResponseBody):
    """An account's credits: ``total`` = ``available`` + ``reserved`` (jobs in flight)."""

    account: str
    total: int
    reserved: int
    available: int
    buckets: Buckets
    paused: bool
    paused_since: datetime | None
    auto_recharge: AutoRecharge
    spend_guards: SpendGuards


class LedgerEntry(ResponseBody):
    """One append-only ledger row; deltas are signed credit changes per bucket."""

    id: int
    kind: str
    reference: str
    amount: int
    subscription_delta: int
    purchased_delta: int
    debt_delta: int
    reserved_delta: int
    forfeited: int
    job_id: str | None
    created_at: datetime


class LedgerPage(ResponseBody):
    """A page of ledger rows, oldest first; pass ``next_cursor`` back for the next page."""

    entries: list[LedgerEntry]
    next_cursor: str | None


class PageQuery(BaseModel):
    """Query parameters of a paged list."""

    model_config = ConfigDict(extra="ignore")

    cursor: str = Field("", max_length=200, description="next_cursor of the previous page")
    limit: int = Field(100, ge=1, le=500)


class CreditsIn(RequestBody):
    """Credits to add: a purchase (refundable) or a manual adjustment."""

    amount: PositiveCredits
    kind: Literal["purchase", "adjustment"]
    note: Note = ""


class CreditsOut(ResponseBody):
    """A grant; ``reference`` identifies it (a purchase's is what a refund names)."""

    account: str
    reference: str
    amount: int
    kind: str
    note: str
    balance: BalanceOut


class RefundIn(RequestBody):
    """Take back unspent credits of one purchase."""

    purchase_reference: Reference
    amount: PositiveCredits


class RefundOut(ResponseBody):
    """A refund and the balance after it."""

    account: str
    reference: str
    purchase_reference: str
    amount: int
    balance: BalanceOut


class OptOut(ResponseBody):
    """A recipient who asked this account to stop messaging them."""

    number: str
    source: str
    created_at: datetime


class OptOutPage(ResponseBody):
    """A page of the opt-out list, ordered by number."""

    opt_outs: list[OptOut]
    next_cursor: str | None


class ErrorDetail(ResponseBody):
    """A stable machine-readable ``code``, a human message and structured details."""

    code: str
    message: str
    field: str | None = Field(
        default=None, description="the request field at fault (the first one, when several "
                                  "are: all are in details.errors); null when none is")
    details: dict[str, Any]


class ErrorOut(ResponseBody):
    """Every error response."""

    error: ErrorDetail


class CountryLineOut(ResponseBody):
    """Billable recipients of one country: SMS parts, credits, credits per part."""

    recipients: int
    segments: int
    credits: int
    rate: int


class SkippedExample(ResponseBody):
    """One skipped recipient: its index in ``recipients`` and why."""

    index: int
    reason: Literal["invalid", "opted_out", "duplicate", "missing_variable",
                    "country_not_allowed", "price_above_limit"]


class SkippedOut(ResponseBody):
    """Recipients that would not be sent to, by reason; the first 100 listed."""

    invalid: int = Field(description="not a valid phone number in E.164 form")
    opted_out: int = Field(description="on the account's opt-out list")
    duplicate: int = Field(description="the same number earlier in the list")
    missing_variable: int = Field(description="vars lacks a variable the body uses")
    country_not_allowed: int = Field(description=(
        "a country outside the account's allowed_countries (spend guards): never reserved"))
    price_above_limit: int = Field(description=(
        "one message would cost more than the account's max_credits_per_message"))
    examples: list[SkippedExample]


class PreflightAutoRecharge(ResponseBody):
    """The account's auto-recharge settings and what they would do for this broadcast."""

    enabled: bool
    threshold: int
    amount: int
    covers_shortfall: bool
    top_ups_needed: int = Field(description="top-ups of ``amount`` the shortfall would take")


class Ucs2Character(ResponseBody):
    """A character that makes the messages holding it UCS-2 (70 / 67 units a part)."""

    character: str
    code_point: str = Field(description="U+XXXX")
    name: str = Field(description="its Unicode name, empty when it has none")
    smart_encodable: bool = Field(
        description="Smart Encoding would replace it (turn the account setting on)")


class ScheduleOut(ResponseBody):
    """When a scheduled broadcast goes, and what the balance available today covers of it."""

    send_at: datetime
    covered_today: int = Field(description=(
        "billable recipients the balance available now would cover (at their average price)"))
    note: str


class QuietHoursPreflight(ResponseBody):
    """Who the account's quiet hours would defer, if the broadcast went at ``at``."""

    start: str
    end: str
    at: datetime
    deferred: int
    estimated: bool = Field(description=(
        "past 5,000 billable recipients, `deferred` is scaled from an even sample of them"))
    deferred_until: datetime | None


class QuietHoursSettings(ResponseBody):
    """The account's quiet hours: a daily window of the recipient's local time (HH:MM) in
    which bulk messages wait (deferred, never dropped); transactional ones are exempt."""

    start: str | None = Field(description="HH:MM local time, e.g. 21:00; null: none")
    end: str | None = Field(description="HH:MM local time, e.g. 08:00 (before start: the "
                                        "window crosses midnight)")


Clock = Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]


class QuietHoursUpdate(RequestBody):
    """New quiet hours: both times, or both null to turn them off."""

    start: Clock | None
    end: Clock | None

    @field_validator("end")
    @classmethod
    def _both_or_none(cls, end: str | None, info: ValidationInfo) -> str | None:
        start = info.data.get("start")
        if (start is None) != (end is None):
            raise ValueError("give both start and end, or neither")
        if start is not None and start == end:
            raise ValueError("start and end must differ")
        return end


class JobCanceled(ResponseBody):
    """A cancel's answer: the job is ``canceled`` (now or before); nothing was charged."""

    job_id: str
    status: Literal["canceled"]


class FitsTodayOut(ResponseBody):
    """How much of the broadcast the daily cap lets go today (UTC), in recipient order; the
    rest is held with reason daily_cap until the next UTC day."""

    remaining_today: int
    recipients: int
    credits: int
    held_until_tomorrow: int


class PreflightOut(ResponseBody):
    """What a broadcast would cost now, who would be skipped, and what to do."""

    recipients: int
    billable: int
    segments: int = Field(description="SMS parts of the text as it will be sent")
    credits: int
    smart_encoding: bool = Field(
        description="the account's Smart Encoding setting, applied to these figures")
    ucs2_characters: list[Ucs2Character] = Field(description=(
        "characters outside GSM-7 in the messages as sent (the body's first, then the "
        "variables'), at most 50: each makes the message holding it UCS-2"))
    savings: int = Field(description=(
        "credits the broadcast would cost less without those characters (0 when none)"))
    by_country: dict[str, CountryLineOut]
    skipped: SkippedOut
    available: int
    shortfall: int
    auto_recharge: PreflightAutoRecharge
    advice: Literal["ok", "ok_with_auto_recharge", "enable_auto_recharge", "top_up"]
    schedule: ScheduleOut | None = Field(description=(
        "a broadcast with a send_at ahead: credits are reserved then, from the balance then; "
        "the figures above (available, shortfall, advice) are today's"))
    quiet_hours: QuietHoursPreflight | None = Field(description=(
        "the account's quiet hours (bulk only): recipients that would be deferred if sent at "
        "`at` (now, or the send_at) and the last moment one of them would go; null when the "
        "account has none or the broadcast is transactional"))
    fits_today: FitsTodayOut | None = Field(
        default=None, description="null when the account has no daily spend cap")


class BroadcastAccepted(ResponseBody):
    """A broadcast accepted for sending, and the pre-flight it passed."""

    broadcast_id: str
    status: str
    preflight: PreflightOut


class BroadcastProgress(ResponseBody):
    """Where a broadcast stands; recipients move pending -> sending -> sent -> delivered."""

    broadcast_id: str
    account: str
    status: Literal["scheduled", "running", "completed", "canceled"]
    total: int
    skipped: int
    pending: int = Field(description="not yet reserved")
    sending: int
    sent: int
    delivered: int
    failed: int
    held: int = Field(description="waiting for credits (the account is paused)")
    canceled: int
    credits_reserved: int
    credits_spent: int
    created_at: datetime
    finished_at: datetime | None
    send_at: datetime | None = Field(description="a scheduled broadcast starts then")
    deferred: int = Field(description=(
        "recipients waiting for the end of their quiet hours (nothing reserved yet)"))
    deferred_until: datetime | None = Field(description="when the last deferred one may go")
