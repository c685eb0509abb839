"""The official twilio library against our sandbox, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator

from dispatcher.sandbox import NumberRule, SandboxState, Scenario
from dispatcher.sandbox.resources import count_segments
from dispatcher.twilio.http import basic_auth, rewrite_url
from tests.integration.sandbox_fixture import SandboxHandle

SENDER = "+15005550006"
TO = "+447700900123"


@dataclass
class Receiver:
    """A tiny status-callback receiver: keeps what arrived, answers 204."""

    base_url: str = ""
    calls: list[tuple[str, dict[str, str], str]] = field(default_factory=list)

    def statuses(self, key: str) -> list[str]:
        return [params[key] for _, params, _ in self.calls]


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()

    async def handle(request: web.Request) -> web.Response:
        form = await request.post()
        url = found.base_url + request.rel_url.path_qs
        found.calls.append((url, {k: str(v) for k, v in form.items()},
                            request.headers.get("X-Twilio-Signature", "")))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/status/{job}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield found
    await runner.cleanup()


async def send(sandbox: SandboxHandle, to: str = TO, **kwargs: object) -> Any:
    params: dict[str, object] = {"from_": SENDER, "body": "hello"}
    params.update(kwargs)
    return await sandbox.client().messages.create_async(to=to, **params)


async def test_message_create_returns_twilio_shaped_instance(
        twilio_sandbox: SandboxHandle) -> None:
    message = await send(twilio_sandbox, status_callback="http://127.0.0.1:9/status/j1")
    assert re.fullmatch(r"SM[0-9a-f]{32}", message.sid)
    assert message.status == "queued"
    assert (message.to, message.from_, message.body) == (TO, SENDER, "hello")
    assert message.num_segments == "1"
    assert message.price is None
    assert message.account_sid == twilio_sandbox.account_sid
    assert message.direction == "outbound-api"
    assert isinstance(message.date_created, datetime)
    assert message.uri == (f"/2010-04-01/Accounts/{twilio_sandbox.account_sid}/Messages/"
                           f"{message.sid}.json")
    [record] = twilio_sandbox.state.creates(to=TO)
    assert (record.sid, record.kind, record.status_callback) == (
        message.sid, "sms", "http://127.0.0.1:9/status/j1")


async def test_messaging_service_and_segments(twilio_sandbox: SandboxHandle) -> None:
    service = "MG" + "a" * 32
    message = await twilio_sandbox.client().messages.create_async(
        to=TO, messaging_service_sid=service, body="é€" + "ж" * 69)
    assert (message.messaging_service_sid, message.from_) == (service, None)
    assert message.num_segments == "2"


@pytest.mark.parametrize(("body", "segments"), [
    ("a" * 160, 1), ("a" * 161, 2), ("a" * 306, 2), ("a" * 307, 3), ("€" * 80, 1),
    ("€" * 81, 2), ("ж" * 70, 1), ("ж" * 71, 2), ("ж" * 134, 2), ("ж" * 135, 3),
    ("😀" * 35, 1), ("😀" * 36, 2),
])
def test_count_segments(body: str, segments: int) -> None:
    assert count_segments(body) == segments


async def test_call_create_and_fetch(twilio_sandbox: SandboxHandle) -> None:
    client = twilio_sandbox.client()
    call = await client.calls.create_async(to=TO, from_="+14158675308",
                                           twiml="<Response><Say>hi</Say></Response>",
                                           time_limit=120)
    assert re.fullmatch(r"CA[0-9a-f]{32}", call.sid)
    assert (call.status, call.to, call.from_formatted) == ("queued", TO, "(415) 867-5308")
    assert twilio_sandbox.state.creates(kind="call")[0].time_limit == 120
    await twilio_sandbox.wait_callbacks()
    fetched = await client.calls(call.sid).fetch_async()
    assert (fetched.status, fetched.duration) == ("completed", "5")


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"to": "", "from_": SENDER, "body": "x"}, 21604),
    ({"to": TO, "from_": SENDER}, 21602),
    ({"to": TO, "body": "x"}, 21603),
    ({"to": TO, "from_": "+1-not-valid!", "body": "x"}, 21606),
    ({"to": "0044 7700 900", "from_": SENDER, "body": "x"}, 21211),
    ({"to": TO, "from_": SENDER, "body": "x" * 1601}, 21617),
])
async def test_invalid_messages_are_refused_like_twilio(
        twilio_sandbox: SandboxHandle, kwargs: dict[str, str], code: int) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await twilio_sandbox.client().messages.create_async(**kwargs)
    assert (caught.value.code, caught.value.status) == (code, 400)
    assert twilio_sandbox.state.count(accepted=True) == 0


@pytest.mark.parametrize(("code", "status"), [
    (21211, 400), (21610, 400), (21614, 400), (20429, 429)])
async def test_scenario_error_codes(twilio_sandbox: SandboxHandle, code: int,
                                    status: int) -> None:
    twilio_sandbox.state.set_rule(TO, NumberRule(error_code=code))
    with pytest.raises(TwilioRestException) as caught:
        await send(twilio_sandbox)
    assert (caught.value.code, caught.value.status) == (code, status)
    assert caught.value.uri.endswith("/Messages.json")
    await send(twilio_sandbox, to="+447700900999")  # other numbers are unaffected


async def test_rate_limited_twice_then_success(twilio_sandbox: SandboxHandle) -> None:
    twilio_sandbox.state.set_rule(TO, NumberRule(error_code=20429, fail_times=2))
    for _ in range(2):
        with pytest.raises(TwilioRestException) as caught:
            await send(twilio_sandbox)
        assert (caught.value.status, caught.value.code) == (429, 20429)
    message = await send(twilio_sandbox)
    assert message.status == "queued"
    assert twilio_sandbox.state.count(to=TO) == 3
    assert twilio_sandbox.state.count(to=TO, accepted=True) == 1


async def test_500_after_accept_still_sends_and_reports(
        twilio_sandbox: SandboxHandle, receiver: Receiver) -> None:
    twilio_sandbox.state.set_rule(TO, NumberRule(accept_then_500=True))
    url = f"{receiver.base_url}/status/job-500"
    with pytest.raises(TwilioRestException) as caught:
        await send(twilio_sandbox, status_callback=url)
    assert (caught.value.status, caught.value.code) == (500, 20500)
    [record] = twilio_sandbox.state.creates(to=TO, status_callback=url)
    assert record.accepted and record.outcome == "accepted_then_500"
    await twilio_sandbox.wait_callbacks()
    assert receiver.statuses("MessageStatus") == ["queued", "sent", "delivered"]
    assert {p["MessageSid"] for _, p, _ in receiver.calls} == {record.sid}


async def test_hang_is_cut_by_our_timeout(twilio_sandbox: SandboxHandle) -> None:
    twilio_sandbox.state.set_rule(TO, NumberRule(hang=True))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await twilio_sandbox.client(timeout=0.3).messages.create_async(
            to=TO, from_=SENDER, body="x")
    assert 0.25 < time.monotonic() - started < 5.0  # a hang would never end
    assert twilio_sandbox.state.creates(to=TO)[0].outcome == "hang"


async def test_accept_then_hang_still_reports_by_callback(
        twilio_sandbox: SandboxHandle, receiver: Receiver) -> None:
    twilio_sandbox.state.set_rule(TO, NumberRule(accept_then_hang=True))
    twilio_sandbox.state.configure(callback_delay_ms=20)
    url = f"{receiver.base_url}/status/job-lost"
    with pytest.raises(TimeoutError):
        await twilio_sandbox.client(timeout=0.2).messages.create_async(
            to=TO, from_=SENDER, body="x", status_callback=url)
    await twilio_sandbox.wait_callbacks()
    [record] = twilio_sandbox.state.creates(status_callback=url, accepted=True)
    assert receiver.statuses("MessageStatus") == ["queued", "sent", "delivered"]
    assert receiver.calls[0][1]["MessageSid"] == record.sid


async def test_library_ignores_its_own_timeout(twilio_sandbox: SandboxHandle) -> None:
    """twilio-python #925, verified: AsyncTwilioHttpClient(timeout=...) does not bound a create."""
    twilio_sandbox.state.set_rule(TO, NumberRule(hang=True))
    library = AsyncTwilioHttpClient(timeout=0.1)
    url = (f"{twilio_sandbox.base_url}/2010-04-01/Accounts/{twilio_sandbox.account_sid}"
           "/Messages.json")
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):  # only our bound ends it
                await library.request("POST", url, data={"To": TO, "From": SENDER, "Body": "x"},
                                      headers={"Authorization": basic_auth(
                                          twilio_sandbox.account_sid, twilio_sandbox.auth_token)})
    finally:
        await library.close()


async def test_status_callbacks_are_signed_like_twilio(
        twilio_sandbox: SandboxHandle, receiver: Receiver) -> None:
    url = f"{receiver.base_url}/status/job-1?attempt=1"
    message = await send(twilio_sandbox, status_callback=url, body="ж" * 71)
    await twilio_sandbox.wait_callbacks()
    assert receiver.statuses("MessageStatus") == ["queued", "sent", "delivered"]
    validator = RequestValidator(twilio_sandbox.auth_token)
    for seen_url, params, signature in receiver.calls:
        assert seen_url == url
        assert validator.validate(seen_url, params, signature)
        assert (params["MessageSid"], params["SmsSid"]) == (message.sid, message.sid)
        assert params["NumSegments"] == "2"
        assert (params["AccountSid"], params["To"], params["From"]) == (
            twilio_sandbox.account_sid, TO, SENDER)
    seen_url, params, signature = receiver.calls[-1]
    assert not validator.validate(seen_url, {**params, "MessageStatus": "failed"}, signature)
    assert not validator.validate(seen_url.replace("job-1", "job-2"), params, signature)
    assert not RequestValidator("not-the-token").validate(seen_url, params, signature)


async def test_carrier_filtered_is_accepted_then_undelivered(
        twilio_sandbox: SandboxHandle, receiver: Receiver) -> None:
    twilio_sandbox.state.set_rule(TO, NumberRule(error_code=30007))
    client = twilio_sandbox.client()
    message = await send(twilio_sandbox, status_callback=f"{receiver.base_url}/status/j")
    assert message.status == "queued"
    await twilio_sandbox.wait_callbacks()
    assert receiver.statuses("MessageStatus") == ["queued", "sent", "undelivered"]
    assert receiver.calls[-1][1]["ErrorCode"] == "30007"
    fetched = await client.messages(message.sid).fetch_async()
    assert (fetched.status, fetched.error_code) == ("undelivered", 30007)


async def test_call_callbacks_report_duration_bounded_by_time_limit(
        twilio_sandbox: SandboxHandle, receiver: Receiver) -> None:
    twilio_sandbox.state.set_rule(TO, NumberRule(call_duration_s=42))
    call = await twilio_sandbox.client().calls.create_async(
        to=TO, from_=SENDER, url="http://example.test/twiml", time_limit=30,
        status_callback=f"{receiver.base_url}/status/call-1",
        status_callback_event=["initiated", "ringing", "answered", "completed"])
    await twilio_sandbox.wait_callbacks()
    assert receiver.statuses("CallStatus") == ["initiated", "ringing", "in-progress",
                                               "completed"]
    validator = RequestValidator(twilio_sandbox.auth_token)
    assert all(validator.validate(u, p, s) for u, p, s in receiver.calls)
    final = receiver.calls[-1][1]
    assert (final["CallSid"], final["CallDuration"], final["Duration"]) == (call.sid, "30", "1")


async def test_call_without_events_reports_completed_only(
        twilio_sandbox: SandboxHandle, receiver: Receiver) -> None:
    twilio_sandbox.state.set_rule(TO, NumberRule(call_status="busy"))
    await twilio_sandbox.client().calls.create_async(
        to=TO, from_=SENDER, twiml="<Response/>", status_callback=f"{receiver.base_url}/status/c")
    await twilio_sandbox.wait_callbacks()
    assert receiver.statuses("CallStatus") == ["busy"]


async def test_wrong_credentials_get_20003(twilio_sandbox: SandboxHandle) -> None:
    for client in (twilio_sandbox.client(auth_token="wrong"),
                   twilio_sandbox.client(account_sid="AC" + "0" * 32)):
        with pytest.raises(TwilioRestException) as caught:
            await client.messages.create_async(to=TO, from_=SENDER, body="x")
        assert (caught.value.status, caught.value.code) == (401, 20003)
    assert twilio_sandbox.state.count() == 0


async def test_unknown_sid_is_20404(twilio_sandbox: SandboxHandle) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await twilio_sandbox.client().messages("SM" + "0" * 32).fetch_async()
    assert (caught.value.status, caught.value.code) == (404, 20404)


async def test_callbacks_suppressed_still_progress(
        twilio_sandbox: SandboxHandle, receiver: Receiver) -> None:
    twilio_sandbox.state.configure(callbacks_enabled=False)
    message = await send(twilio_sandbox, status_callback=f"{receiver.base_url}/status/j")
    await twilio_sandbox.wait_callbacks()
    assert receiver.calls == []
    listed = await twilio_sandbox.client().messages.list_async(to=TO)
    assert [(m.sid, m.status) for m in listed] == [(message.sid, "delivered")]


async def test_receiver_down_is_retried_then_skipped(twilio_sandbox: SandboxHandle) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    await send(twilio_sandbox, status_callback=f"http://127.0.0.1:{port}/status/j")
    await twilio_sandbox.wait_callbacks()
    attempts = [(c.status, c.attempts, c.http_status) for c in twilio_sandbox.state.callbacks]
    assert attempts == [("queued", 4, None), ("sent", 4, None), ("delivered", 4, None)]


async def test_control_api(twilio_sandbox: SandboxHandle) -> None:
    base = twilio_sandbox.base_url
    scenario = {"latency_ms": 1, "numbers": {TO: {"error_code": 21610}}}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/_sandbox/scenario", json=scenario) as response:
            assert response.status == 200
            assert (await response.json())["numbers"][TO]["error_code"] == 21610
        with pytest.raises(TwilioRestException):
            await send(twilio_sandbox)
        await send(twilio_sandbox, to="+447700900999")
        async with http.get(f"{base}/_sandbox/creates", params={"to": TO}) as response:
            creates = await response.json()
        assert creates["count"] == 1
        assert creates["creates"][0]["error_code"] == 21610
        async with http.post(f"{base}/_sandbox/scenario", json={"bogus": 1}) as response:
            assert response.status == 400
        async with http.post(f"{base}/_sandbox/reset") as response:
            assert response.status == 200
        async with http.get(f"{base}/_sandbox/creates") as response:
            assert (await response.json())["count"] == 0
    await send(twilio_sandbox)


def test_random_failures_are_seeded() -> None:
    outcomes = []
    for _ in range(2):
        state = SandboxState(scenario=Scenario(failure_rate=0.5, seed=7))
        outcomes.append([state.decide(TO).action for _ in range(20)])
    assert outcomes[0] == outcomes[1]
    assert {"accept", "refuse"} == set(outcomes[0])


async def test_many_concurrent_creates(twilio_sandbox: SandboxHandle) -> None:
    client = twilio_sandbox.client()
    sent = await asyncio.gather(*(client.messages.create_async(
        to=f"+1415555{i:04d}", from_=SENDER, body="x") for i in range(300)))
    assert len({m.sid for m in sent}) == 300
    assert twilio_sandbox.state.count(accepted=True) == 300


@pytest.mark.parametrize(("url", "expected"), [
    ("https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json?x=1",
     "http://127.0.0.1:9/sb/2010-04-01/Accounts/AC1/Messages.json?x=1"),
    ("https://api.dublin.ie1.twilio.com/2010-04-01/Calls.json",
     "http://127.0.0.1:9/sb/2010-04-01/Calls.json"),
    ("https://example.com/media.png", "https://example.com/media.png"),
    ("https://eviltwilio.com/x", "https://eviltwilio.com/x"),
])
def test_rewrite_url(url: str, expected: str) -> None:
    assert rewrite_url(url, "http://127.0.0.1:9/sb/") == expected
    assert rewrite_url(url, "") == url
