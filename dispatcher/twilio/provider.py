"""Build the official twilio client for our settings: real Twilio, or the sandbox."""

from __future__ import annotations

from typing import Any

from twilio.rest import Client

from dispatcher.settings import Settings
from dispatcher.twilio.http import SandboxAwareHttpClient

SANDBOX_ACCOUNT_SID = "AC" + "0" * 32
SANDBOX_AUTH_TOKEN = "sandbox-auth-token"  # noqa: S105 - the local sandbox's, not a secret


def credentials(settings: Settings) -> tuple[str, str]:
    """(account SID, auth token): the configured ones, or the sandbox's defaults."""
    if settings.twilio_account_sid and settings.twilio_auth_token:
        return settings.twilio_account_sid, settings.twilio_auth_token
    return SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN


def build_twilio_client(settings: Settings) -> Any:
    """A ``twilio.rest.Client`` whose async HTTP goes to Twilio or to ``twilio_base_url``."""
    sid, token = credentials(settings)
    # One connection per job in flight: a smaller pool would queue creates behind each other.
    http_client = SandboxAwareHttpClient(base_url=settings.twilio_base_url,
                                         timeout=settings.twilio_timeout_seconds,
                                         pool_limit=max(100, settings.max_in_flight))
    return Client(sid, token, http_client=http_client)
