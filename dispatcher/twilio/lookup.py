"""Asking the provider what became of a send whose answer we never got."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any, Protocol

from dispatcher.twilio.callbacks import ProviderStatus, read_call_status, read_sms_status

LOOKUP_TIMEOUT_SECONDS = 15.0


class ProviderLookup(Protocol):
    """Find a message or call the provider holds for a job, by what was sent."""

    async def find(self, kind: str, payload: dict[str, Any],
                   since: datetime) -> list[ProviderStatus]: ...

    async def fetch(self, kind: str, sid: str) -> ProviderStatus | None: ...


class TwilioLookup:
    """Searches Twilio's message and call lists by recipient, sender and time, then by body."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def find(self, kind: str, payload: dict[str, Any],
                   since: datetime) -> list[ProviderStatus]:
        after = since - timedelta(minutes=1)
        async with asyncio.timeout(LOOKUP_TIMEOUT_SECONDS):
            if kind == "sms":
                return await self._find_sms(payload, after)
            return await self._find_call(payload, after)

    async def fetch(self, kind: str, sid: str) -> ProviderStatus | None:
        async with asyncio.timeout(LOOKUP_TIMEOUT_SECONDS):
            if kind == "sms":
                return _message_status(await self._client.messages(sid).fetch_async())
            return _call_status(await self._client.calls(sid).fetch_async())

    async def _find_sms(self, payload: dict[str, Any], after: datetime) -> list[ProviderStatus]:
        filters: dict[str, Any] = {"to": payload["to"], "date_sent_after": after, "limit": 50}
        if payload.get("from"):
            filters["from_"] = payload["from"]
        messages = await self._client.messages.list_async(**filters)
        found = [_message_status(m) for m in messages if m.body == payload["body"]]
        return [f for f in found if f is not None]

    async def _find_call(self, payload: dict[str, Any], after: datetime) -> list[ProviderStatus]:
        calls = await self._client.calls.list_async(
            to=payload["to"], from_=payload["from"], start_time_after=after, limit=50)
        found = [_call_status(c) for c in calls]
        return [f for f in found if f is not None]


def _message_status(message: Any) -> ProviderStatus | None:
    return read_sms_status({"MessageSid": message.sid, "MessageStatus": str(message.status),
                            "NumSegments": str(message.num_segments or ""),
                            "ErrorCode": str(message.error_code or "")})


def _call_status(call: Any) -> ProviderStatus | None:
    return read_call_status({"CallSid": call.sid, "CallStatus": str(call.status),
                             "CallDuration": str(call.duration or "")})
