"""Twilio's error codes in one table, and the one decision it drives: fail, retry or unknown.

``failed``  — Twilio definitely did not send: end the job, release its credits.
``retry``   — refused before sending, worth trying again later (rate limits, our config).
``unknown`` — the request may have reached Twilio (5xx, timeout): never resend by ourselves.
"""

from __future__ import annotations

from typing import Literal

Decision = Literal["failed", "retry", "unknown"]

# code: (decision, our machine-readable reason)
TWILIO_ERRORS: dict[int, tuple[Decision, str]] = {
    20003: ("retry", "provider_auth_failed"),
    20429: ("retry", "provider_rate_limited"),
    14107: ("retry", "provider_rate_limited"),
    21211: ("failed", "invalid_recipient"),
    21214: ("failed", "invalid_recipient"),
    21217: ("failed", "invalid_recipient"),
    21219: ("failed", "unverified_recipient"),
    21401: ("failed", "invalid_recipient"),
    21408: ("failed", "region_not_enabled"),
    21602: ("failed", "invalid_body"),
    21603: ("failed", "invalid_sender"),
    21604: ("failed", "invalid_recipient"),
    21606: ("failed", "invalid_sender"),
    21610: ("failed", "opted_out"),
    21612: ("failed", "unreachable_recipient"),
    21614: ("failed", "not_a_mobile_number"),
    21617: ("failed", "body_too_long"),
    21659: ("failed", "invalid_sender"),
    30003: ("failed", "unreachable_recipient"),
    30004: ("failed", "blocked_by_recipient"),
    30005: ("failed", "unknown_recipient"),
    30006: ("failed", "landline_or_unreachable"),
    30007: ("failed", "carrier_filtered"),
    30008: ("failed", "delivery_failed"),
}


def classify(http_status: int | None, code: int | None) -> tuple[Decision, str]:
    """Decide from a Twilio error response what becomes of the job."""
    if code is not None and code in TWILIO_ERRORS:
        return TWILIO_ERRORS[code]
    if http_status == 429:
        return "retry", "provider_rate_limited"
    if http_status is None or http_status >= 500:
        return "unknown", "provider_error"
    if http_status in (401, 403):
        return "retry", "provider_auth_failed"
    # Any other 4xx: Twilio validated and refused the request, nothing was sent.
    return "failed", f"provider_rejected_{code or http_status}"


def code_class(http_status: int | None, timed_out: bool = False) -> str:
    """The metrics label for a provider error: 4xx, 429, 5xx, timeout or network."""
    if timed_out:
        return "timeout"
    if http_status is None:
        return "network"
    if http_status == 429:
        return "429"
    return "5xx" if http_status >= 500 else "4xx"
