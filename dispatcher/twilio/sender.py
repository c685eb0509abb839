"""Sending through Twilio: one bounded provider call per attempt, its outcome as a value.

The official ``twilio`` library's async client is used with our own HTTP client (see
``twilio_http``): our timeout on every call, never the library's retries — a retried create
can send twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from twilio.base.exceptions import TwilioRestException

from dispatcher.twilio.errors import Decision, classify, code_class


@dataclass(frozen=True)
class SmsRequest:
    to: str
    body: str
    from_: str | None
    messaging_service_sid: str | None
    status_callback: str
    # Twilio's ValidityPeriod (1-36000 s): Twilio drops the message if still queued after it.
    validity_period: int | None = None


@dataclass(frozen=True)
class CallRequest:
    to: str
    from_: str
    twiml: str | None
    url: str | None
    time_limit_seconds: int
    status_callback: str


@dataclass(frozen=True)
class Accepted:
    sid: str


@dataclass(frozen=True)
class Refused:
    """Twilio answered with an error, or the request did not get through."""

    decision: Decision
    reason: str
    code: int | None
    code_class: str


SendResult = Accepted | Refused


@dataclass(frozen=True)
class _Created:
    """What a create answered that we use."""

    sid: str


class Sender(Protocol):
    """Anything that can hand a message or a call to the provider."""

    async def send_sms(self, request: SmsRequest) -> SendResult: ...

    async def send_call(self, request: CallRequest) -> SendResult: ...


class TwilioSender:
    """The real sender: the official twilio client, bounded by our own timeout."""

    def __init__(self, client: Any, timeout_seconds: float) -> None:
        self._client = client
        self._timeout = timeout_seconds
        self._messages: Any = None  # the client's MessageList, once looked up

    async def send_sms(self, request: SmsRequest) -> SendResult:
        form: dict[str, object] = {"To": request.to, "Body": request.body,
                                   "StatusCallback": request.status_callback}
        if request.messaging_service_sid:
            form["MessagingServiceSid"] = request.messaging_service_sid
        else:
            form["From"] = request.from_
        if request.validity_period is not None:
            form["ValidityPeriod"] = request.validity_period
        return await self._call(self._create_message, {"form": form})

    async def _create_message(self, form: dict[str, object]) -> _Created:
        """``messages.create_async`` without the parts we do not use (issue 15): the same
        request through the library's own API version object (its auth, headers, errors as
        ``TwilioRestException``), but neither the 30-parameter form nor a ``MessageInstance``
        (about 25 fields, three dates parsed) built per message: only the SID is read."""
        messages = self._messages
        if messages is None:
            messages = self._messages = self._client.messages
        payload = await messages._version.create_async(
            method="POST", uri=messages._uri, data=form,
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "Accept": "application/json"})
        return _Created(str(payload["sid"]))

    async def send_call(self, request: CallRequest) -> SendResult:
        params: dict[str, Any] = {
            "to": request.to, "from_": request.from_, "time_limit": request.time_limit_seconds,
            "status_callback": request.status_callback,
            "status_callback_event": ["initiated", "ringing", "answered", "completed"],
        }
        if request.twiml:
            params["twiml"] = request.twiml
        else:
            params["url"] = request.url
        return await self._call(self._client.calls.create_async, params)

    async def _call(self, create: Any, params: dict[str, Any]) -> SendResult:
        try:
            async with asyncio.timeout(self._timeout):
                instance = await create(**params)
        except TimeoutError:
            return Refused("unknown", "provider_timeout", None, code_class(None, timed_out=True))
        except TwilioRestException as exc:
            decision, reason = classify(exc.status, exc.code)
            return Refused(decision, reason, exc.code, code_class(exc.status))
        except aiohttp.ClientConnectorError:
            # The connection was never made: Twilio cannot have received the request.
            return Refused("retry", "provider_unreachable", None, "network")
        except aiohttp.ClientError:
            return Refused("unknown", "provider_connection_lost", None, "network")
        return Accepted(str(instance.sid))
