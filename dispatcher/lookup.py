"""Asking the provider what became of a send whose answer we never got."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any, Protocol

from dispatcher.callbacks import ProviderStatus, read_call_status, read_sms_status

LOOKUP_TIMEOUT_SECONDS = 15.0


class ProviderLookup(Protocol):
    """Find a message or call the provider holds for a job, by what was sent."""

    async def find(self, kind: str, payload: dict[str, Any],
                   since: datetime) -> ProviderStatus | None: ...


class TwilioLookup:
    """Searches Twilio's message and call lists by recipient, sender and time, then by body."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def find(self, kind: str, payload: dict[str, Any],
                   since: datetime) -> ProviderStatus | None:
        after = since - timedelta(minutes=1)
        async with asyncio.timeout(LOOKUP_TIMEOUT_SECONDS):
            if kind == "sms":
                return await self._find_sms(payload, after)
            return await self._find_call(payload, after)

    async def _find_sms(self, payload: dict[str, Any], after: datetime) -> ProviderStatus | None:
        filters: dict[str, Any] = {"to": payload["to"], "date_sent_after": after, "limit": 50}
        if payload.get("from"):
            filters["from_"] = payload["from"]
        for message in await self._client.messages.list_async(**filters):
            if message.body == payload["body"]:
                return read_sms_status({"MessageSid": message.sid,
                                        "MessageStatus": str(message.status),
                                        "NumSegments": str(message.num_segments or ""),
                                        "ErrorCode": str(message.error_code or "")})
        return None

    async def _find_call(self, payload: dict[str, Any], after: datetime) -> ProviderStatus | None:
        calls = await self._client.calls.list_async(
            to=payload["to"], from_=payload["from"], start_time_after=after, limit=50)
        for call in calls:
            return read_call_status({"CallSid": call.sid, "CallStatus": str(call.status),
                                     "CallDuration": str(call.duration or "")})
        return None
