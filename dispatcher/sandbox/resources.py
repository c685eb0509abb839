"""Twilio's wire shapes: SIDs, RFC 2822 dates, error bodies, message and call JSON, segments.

Field names and enum values follow Twilio's OpenAPI description of the 2010-04-01 API
(``api.v2010.account.message`` and ``api.v2010.account.call``).
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

if TYPE_CHECKING:
    from dispatcher.sandbox.state import CreateRecord

API_VERSION = "2010-04-01"
MORE_INFO = "https://www.twilio.com/docs/errors/"
E164 = re.compile(r"^\+[1-9]\d{6,14}$")
SHORT_CODE = re.compile(r"^\d{3,8}$")
ALPHA_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
MESSAGING_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}$")
MAX_BODY = 1600

# code: (HTTP status, Twilio's message). Codes >= 30000 are delivery errors: reported in
# status callbacks, never as an HTTP answer to the create.
ERRORS: dict[int, tuple[int, str]] = {
    20003: (401, "Authenticate"),
    20404: (404, "The requested resource was not found"),
    20429: (429, "Too Many Requests"),
    20500: (500, "An internal server error has occurred"),
    20503: (503, "Service Unavailable"),
    14107: (429, "Message rate limit exceeded"),
    21201: (400, "No 'To' number is specified"),
    21205: (400, "Url or Twiml parameter is required"),
    21211: (400, "Invalid 'To' Phone Number"),
    21212: (400, "Invalid 'From' Phone Number"),
    21213: (400, "No 'From' number is specified"),
    21217: (400, "Phone number does not appear to be valid"),
    21219: (400, "'To' phone number not verified"),
    21408: (400, "Permission to send an SMS has not been enabled for the region indicated by "
                 "the 'To' number"),
    21602: (400, "Message body is required."),
    21603: (400, "A 'From' phone number is required."),
    21604: (400, "A 'To' phone number is required."),
    21606: (400, "The 'From' phone number provided is not a valid message-capable Twilio "
                 "phone number for this destination."),
    21610: (400, "Attempt to send to unsubscribed recipient"),
    21612: (400, "The 'To' phone number is not currently reachable via SMS"),
    21614: (400, "'To' number is not a valid mobile number"),
    21617: (400, "The concatenated message body exceeds the 1600 character limit."),
    21624: (400, "Invalid validity period value"),
    21701: (400, "The Messaging Service Sid is invalid."),
    30001: (0, "Queue overflow"),
    30002: (0, "Account suspended"),
    30003: (0, "Unreachable destination handset"),
    30004: (0, "Message blocked"),
    30005: (0, "Unknown destination handset"),
    30006: (0, "Landline or unreachable carrier"),
    30007: (0, "Message filtered"),
    30008: (0, "Unknown error"),
}
MAX_VALIDITY_PERIOD = 36000  # seconds: ValidityPeriod's upper bound in Twilio's OpenAPI
# Delivery errors after which Twilio reports ``failed`` (it never handed the message to a
# carrier); every other delivery error is reported as ``undelivered``.
FAILED_DELIVERY = frozenset({30001, 30002})


class TwilioApiError(Exception):
    """A Twilio error answer: code, HTTP status and message, rendered as Twilio's JSON body."""

    def __init__(self, code: int, status: int | None = None, message: str | None = None) -> None:
        known_status, known_message = ERRORS.get(code, (400, "Error"))
        self.code = code
        self.status = status or known_status or 400
        self.message = message or known_message
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """Twilio's error JSON."""
        return {"code": self.code, "message": self.message,
                "more_info": f"{MORE_INFO}{self.code}", "status": self.status}


def is_delivery_error(code: int | None) -> bool:
    """True for codes reported in status callbacks rather than as an HTTP error."""
    return code is not None and 30000 <= code < 40000


def new_sid(prefix: str) -> str:
    """A Twilio-format SID: two-letter prefix and 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


def now() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


def rfc2822(moment: datetime | None) -> str | None:
    """Format a date the way Twilio does: ``Thu, 24 Aug 2023 05:01:45 +0000``."""
    return None if moment is None else format_datetime(moment.replace(microsecond=0))


_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
_GSM7_EXTENDED = frozenset("^{}\\[~]|€\f")


def count_segments(body: str) -> int:
    """SMS segments for a body: GSM-7 160 single / 153 per part, else UCS-2 70 / 67."""
    septets = 0
    for char in body:
        if char in _GSM7_BASIC:
            septets += 1
        elif char in _GSM7_EXTENDED:
            septets += 2
        else:
            units = len(body.encode("utf-16-le")) // 2
            return 1 if units <= 70 else math.ceil(units / 67)
    return 1 if septets <= 160 else math.ceil(septets / 153)


def formatted_number(number: str | None) -> str | None:
    """Twilio's ``*_formatted`` fields: ``(415) 867-5309`` for NANP numbers, else as given."""
    if number and len(number) == 12 and number.startswith("+1") and number[1:].isdigit():
        return f"({number[2:5]}) {number[5:8]}-{number[8:]}"
    return number


def message_json(rec: CreateRecord, account_sid: str) -> dict[str, Any]:
    """The ``api.v2010.account.message`` resource for a recorded message."""
    uri = f"/{API_VERSION}/Accounts/{account_sid}/Messages/{rec.sid}"
    error_message = ERRORS[rec.error_code][1] if rec.error_code in ERRORS else None
    return {
        "account_sid": account_sid, "api_version": API_VERSION, "body": rec.body,
        "date_created": rfc2822(rec.received_at), "date_sent": rfc2822(rec.date_sent),
        "date_updated": rfc2822(rec.date_updated), "direction": "outbound-api",
        "error_code": rec.error_code, "error_message": error_message, "from": rec.from_,
        "messaging_service_sid": rec.messaging_service_sid, "num_media": "0",
        "num_segments": str(rec.num_segments), "price": None, "price_unit": "USD",
        "sid": rec.sid, "status": rec.status,
        "subresource_uris": {"media": f"{uri}/Media.json", "feedback": f"{uri}/Feedback.json"},
        "to": rec.to, "uri": f"{uri}.json",
    }


def call_json(rec: CreateRecord, account_sid: str) -> dict[str, Any]:
    """The ``api.v2010.account.call`` resource for a recorded call."""
    uri = f"/{API_VERSION}/Accounts/{account_sid}/Calls/{rec.sid}"
    subresources = ("notifications", "recordings", "payments", "events", "siprec", "streams",
                    "transcriptions", "user_defined_message_subscriptions",
                    "user_defined_messages")
    return {
        "account_sid": account_sid, "answered_by": None, "api_version": API_VERSION,
        "caller_name": None, "date_created": rfc2822(rec.received_at),
        "date_updated": rfc2822(rec.date_updated), "direction": "outbound-api",
        "duration": None if rec.duration is None else str(rec.duration),
        "end_time": rfc2822(rec.end_time), "forwarded_from": None, "from": rec.from_,
        "from_formatted": formatted_number(rec.from_), "group_sid": None,
        "parent_call_sid": None, "phone_number_sid": None, "price": None, "price_unit": "USD",
        "queue_time": "0", "sid": rec.sid, "start_time": rfc2822(rec.start_time),
        "status": rec.status,
        "subresource_uris": {name: f"{uri}/{_camel(name)}.json" for name in subresources},
        "to": rec.to, "to_formatted": formatted_number(rec.to), "trunk_sid": None,
        "uri": f"{uri}.json",
    }


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


@dataclass(frozen=True)
class DateWindow:
    """A list's date filters (``DateSent``, ``DateSent<``, ``DateSent>`` and the same for
    ``StartTime``): ``YYYY-MM-DD`` compares days, an ISO 8601 time compares instants; ``<``
    and ``>`` include the bound, as Twilio's ``<=`` / ``>=`` do. A resource without the date
    (not sent or started yet) is outside any filter."""

    on: str | None = None
    before: str | None = None
    after: str | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str], field: str) -> DateWindow:
        window = cls(query.get(field), query.get(f"{field}<"), query.get(f"{field}>"))
        for bound in (window.on, window.before, window.after):
            if bound is not None:
                _moment(bound)  # raises ValueError when it is not a date
        return window

    def holds(self, moment: datetime | None) -> bool:
        if self.on is None and self.before is None and self.after is None:
            return True
        if moment is None:
            return False
        return ((self.on is None or _compare(moment, self.on) == 0)
                and (self.before is None or _compare(moment, self.before) <= 0)
                and (self.after is None or _compare(moment, self.after) >= 0))


def _moment(text: str) -> datetime:
    if len(text) == 10:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _compare(moment: datetime, bound: str) -> int:
    """-1, 0 or 1: ``moment`` before, at or after ``bound`` (a day, or an instant)."""
    if len(bound) == 10:
        day, other = moment.astimezone(UTC).date(), _moment(bound).date()
        return (day > other) - (day < other)
    limit = _moment(bound)
    return (moment > limit) - (moment < limit)


@dataclass(frozen=True)
class PageRequest:
    """``PageSize`` (default 50, at most 1000), ``Page`` and ``PageToken`` of a list read."""

    size: int = 50
    number: int = 0
    token: str | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> PageRequest:
        size = int(query.get("PageSize", "50"))
        if not 1 <= size <= 1000:
            raise ValueError("PageSize must be between 1 and 1000")
        return cls(size, int(query.get("Page", "0")), query.get("PageToken"))


def list_page(key: str, path: str, query: Mapping[str, str],
              items: list[tuple[str, dict[str, Any]]], page: PageRequest) -> dict[str, Any]:
    """One page of a Twilio list answer; ``items`` are (SID, resource), newest first.

    The page token is the SID the previous page ended with (``PA`` + SID), so resources created
    between two page reads push nothing out of the pages still to come (they may repeat one).
    """
    start = 0
    if page.token:
        sids = [sid for sid, _ in items]
        after = page.token.removeprefix("PA")
        start = sids.index(after) + 1 if after in sids else len(items)
    chunk = items[start:start + page.size]
    kept = {k: v for k, v in query.items() if k not in ("Page", "PageSize", "PageToken")}

    def uri(number: int, token: str | None = None) -> str:
        params = {**kept, "PageSize": str(page.size), "Page": str(number)}
        if token:
            params["PageToken"] = token
        return f"{path}?{urlencode(params)}"

    more = start + page.size < len(items)
    return {key: [resource for _, resource in chunk],
            "end": page.number * page.size + max(0, len(chunk) - 1),
            "first_page_uri": uri(0),
            "next_page_uri": uri(page.number + 1, "PA" + chunk[-1][0]) if more else None,
            "page": page.number, "page_size": page.size,
            "previous_page_uri": uri(page.number - 1) if page.number > 0 else None,
            "start": page.number * page.size, "uri": uri(page.number, page.token)}
