"""Asking the provider what became of a send whose answer we never got.

A "not there" answer makes the reconciler send the job again, so it must come from a complete
search: every page of the provider's list for the job's numbers, newest first, down to the
moment the job was claimed for sending (less ``CLOCK_SKEW`` between our clock and Twilio's).
Twilio documents its message list as sorted by ``DateSent``, newest first (the sandbox sorts by
creation): a resource created in the window was sent or started at or after that, so the search
ends at the first one *sent* (started) before the window, whichever of the two orders the list
uses; one not sent yet (no date) never ends it. No ``DateSent`` / ``StartTime`` filter narrows
the list, since it would drop exactly those. A failed or timed-out page raises: no answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from dispatcher.twilio.callbacks import ProviderStatus, read_call_status, read_sms_status

LOOKUP_TIMEOUT_SECONDS = 15.0
CLOCK_SKEW = timedelta(minutes=1)
PAGE_SIZE = 1000  # Twilio's maximum: fewest round trips through a busy number's history


@dataclass(frozen=True)
class Candidate:
    """A resource the provider created in the job's window that could be the job's create."""

    status: ProviderStatus
    created_at: datetime | None


class ProviderLookup(Protocol):
    """Find what the provider holds for a job, by what was sent; fetch one by SID."""

    async def find(self, kind: str, payload: dict[str, Any],
                   since: datetime) -> list[Candidate]:
        """Every candidate created since ``since`` (less the clock skew), newest first.

        SMS candidates match the job's recipient, sender and body exactly; calls only its
        numbers (the provider returns nothing else a call could be told apart by). Raises
        when the search could not be completed.
        """
        ...

    async def fetch(self, kind: str, sid: str) -> ProviderStatus | None: ...


class TwilioLookup:
    """Pages through Twilio's message and call lists for the job's numbers."""

    def __init__(self, client: Any, timeout: float = LOOKUP_TIMEOUT_SECONDS,
                 page_size: int = PAGE_SIZE) -> None:
        self._client = client
        self._timeout = timeout
        self._page_size = page_size

    async def find(self, kind: str, payload: dict[str, Any],
                   since: datetime) -> list[Candidate]:
        after = since - CLOCK_SKEW
        async with asyncio.timeout(self._timeout):
            if kind == "sms":
                return await self._find_sms(payload, after)
            return await self._find_call(payload, after)

    async def fetch(self, kind: str, sid: str) -> ProviderStatus | None:
        async with asyncio.timeout(self._timeout):
            if kind == "sms":
                return _message_status(await self._client.messages(sid).fetch_async())
            return _call_status(await self._client.calls(sid).fetch_async())

    async def _find_sms(self, payload: dict[str, Any], after: datetime) -> list[Candidate]:
        filters: dict[str, Any] = {"to": payload["to"], "page_size": self._page_size}
        if payload.get("from"):
            filters["from_"] = payload["from"]
        service = payload.get("messaging_service_sid")
        found: list[Candidate] = []
        async for message in await self._client.messages.stream_async(**filters):
            if _before(message.date_sent, after):
                break  # everything further down was sent (and created) before the window
            if _before(message.date_created, after) or message.body != payload["body"]:
                continue
            if service and message.messaging_service_sid not in (None, service):
                continue
            found.append(Candidate(_message_status(message) or _exists(message.sid),
                                   message.date_created))
        return found

    async def _find_call(self, payload: dict[str, Any], after: datetime) -> list[Candidate]:
        found: list[Candidate] = []
        async for call in await self._client.calls.stream_async(
                to=payload["to"], from_=payload["from"], page_size=self._page_size):
            if _before(call.start_time, after):
                break
            if _before(call.date_created, after):
                continue
            found.append(Candidate(_call_status(call) or _exists(call.sid), call.date_created))
        return found


def _before(moment: datetime | None, after: datetime) -> bool:
    return moment is not None and moment < after


def _exists(sid: str) -> ProviderStatus:
    """A resource in a status we do not map (``scheduled``, ``read``, ...): it was created."""
    return ProviderStatus(sid, "sent", False, None, None)


def _message_status(message: Any) -> ProviderStatus | None:
    return read_sms_status({"MessageSid": message.sid, "MessageStatus": str(message.status),
                            "NumSegments": str(message.num_segments or ""),
                            "ErrorCode": str(message.error_code or "")})


def _call_status(call: Any) -> ProviderStatus | None:
    return read_call_status({"CallSid": call.sid, "CallStatus": str(call.status),
                             "CallDuration": str(call.duration or "")})
