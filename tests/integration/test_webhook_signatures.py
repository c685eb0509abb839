"""Twilio webhook signatures over real HTTP: the URL exactly as Twilio requested it, every value.

Twilio signs the URL it called byte for byte (percent-escapes and ``+`` untouched) plus every
value of every form field. Each signature here comes from twilio's own
``RequestValidator.compute_signature``, never from our code; requests go over a real socket with
their request target sent as is, to a server whose public base URL may be a proxy's (another
host, a path of its own).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote, urlencode

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, unused_port
from prometheus_client import CollectorRegistry
from twilio.request_validator import RequestValidator
from yarl import URL

from dispatcher.api import add_api_routes
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.jobs.store import JobStore, NewJob
from dispatcher.metrics import Metrics
from dispatcher.twilio.callbacks import StatusCallbacks

TOKEN = "webhook-signature-token"
NUMBER = "+442071838750"
# The public base URLs Twilio is given: None = the server's own address; a proxy's, with a path.
BASES = [None, "https://hooks.example.com/dispatcher", "https://hooks.example.com:8443/a%20b/d"]
QUERIES = ["", "?q=a%20b", "?q=a+b&r=1%2B1", "?next=%2Ftwilio%2Fx", "?city=S%C3%A3o%20Paulo",
           "?t=%7e~&x=2&x=1", "?empty=&flag"]


@dataclass
class Hooks:
    """A server with both Twilio webhooks, the public base URL Twilio uses, and a client."""

    server: TestServer
    public: str
    session: aiohttp.ClientSession
    pool: asyncpg.Pool

    async def post(self, raw_target: str, fields: list[tuple[str, str]],
                   signature: str | None) -> int:
        """POST the form to the raw request target (sent as is, never re-encoded)."""
        url = URL(f"http://127.0.0.1:{self.server.port}{raw_target}", encoded=True)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        async with self.session.post(url, data=urlencode(fields), headers=headers) as resp:
            await resp.read()
            return resp.status


def sign(url: str, fields: list[tuple[str, str]], token: str = TOKEN) -> str:
    """Twilio's signature of this URL and form (the reference, with every repeated value)."""
    params: dict[str, list[str]] = {}
    for name, value in fields:
        params.setdefault(name, []).append(value)
    return RequestValidator(token).compute_signature(url, _Multi(params))


class _Multi(dict[str, list[str]]):
    """The shape ``RequestValidator.get_values`` reads with ``getall`` (like a MultiDict)."""

    def getall(self, name: str) -> list[str]:
        return self[name]


@pytest.fixture(params=BASES, ids=["direct", "proxy-path", "proxy-port-escaped-path"])
async def hooks(request: pytest.FixtureRequest, pool: asyncpg.Pool) -> AsyncIterator[Hooks]:
    port = unused_port()
    public = request.param or f"http://127.0.0.1:{port}"
    callbacks = StatusCallbacks(JobStore(pool), TOKEN, public, Metrics(CollectorRegistry()))
    app = web.Application()
    app.router.add_post("/twilio/status/{job_id}", callbacks.handle)
    add_api_routes(app, pool, twilio_auth_token=TOKEN, public_base_url=public)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        try:
            yield Hooks(server, public, session, pool)
        finally:
            await server.close()


async def sending_job(pool: asyncpg.Pool) -> str:
    account = f"acct-{uuid.uuid4().hex[:10]}"
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 10, "purchase", f"pay-{uuid.uuid4().hex}")
    job_id = f"job-{uuid.uuid4().hex[:10]}"
    begun = await JobStore(pool).begin(NewJob(job_id, account, "sms", "bulk", {"id": job_id}, 1,
                                              "GB", 1, 1))
    assert begun.outcome == "send"
    return job_id


def forgeries(url: str, fields: list[tuple[str, str]]) -> list[str]:
    """Signatures Twilio never made for this request."""
    decoded = unquote(url.replace("+", " "))
    found = [sign(url, fields, "another-token"), sign(url + "&x=1", fields),
             sign(url, fields[:-1]), sign(url, [*fields, ("Extra", "1")]),
             sign(url, [(name, value + "x") for name, value in fields]), "", "bm90IGEgc2ln"]
    if decoded != url:  # what a check over the decoded URL would have accepted
        found.append(sign(decoded, fields))
    return found


@pytest.mark.parametrize("query", QUERIES)
async def test_status_callback_signed_over_the_raw_url_and_every_value(
        hooks: Hooks, query: str) -> None:
    job_id = await sending_job(hooks.pool)
    target = f"/twilio/status/{job_id}{query}"
    fields = [("MessageSid", "SM" + uuid.uuid4().hex), ("MessageStatus", "delivered"),
              ("NumSegments", "1"), ("Tag", "b"), ("Tag", "a"), ("Tag", "b"), ("To", NUMBER)]
    url = hooks.public + target
    for forged in forgeries(url, fields):
        assert await hooks.post(target, fields, forged) == 403, forged
    assert await hooks.post(target, fields, None) == 403
    assert await hooks.pool.fetchval(
        "SELECT status FROM jobs WHERE job_id = $1", job_id) == "sending"

    assert await hooks.post(target, fields, sign(url, fields)) == 204
    assert await hooks.pool.fetchval(
        "SELECT status FROM jobs WHERE job_id = $1", job_id) == "delivered"


@pytest.mark.parametrize("query", QUERIES)
async def test_inbound_webhook_signed_over_the_raw_url_and_every_value(
        hooks: Hooks, query: str) -> None:
    account = f"acct-{uuid.uuid4().hex[:10]}"
    await create_account(hooks.pool, account)
    target = f"/twilio/inbound/{account}{query}"
    fields = [("From", NUMBER), ("To", "+15005550006"), ("Body", "STOP"),
              ("MediaUrl", "https://m.example/2"), ("MediaUrl", "https://m.example/1"),
              ("MessageSid", "SM" + "0" * 32)]
    url = hooks.public + target
    for forged in forgeries(url, fields):
        assert await hooks.post(target, fields, forged) == 403, forged
    assert await hooks.pool.fetchval(
        "SELECT count(*) FROM opt_outs WHERE account_id = $1", account) == 0

    assert await hooks.post(target, fields, sign(url, fields)) == 200
    assert await hooks.pool.fetchval(
        "SELECT count(*) FROM opt_outs WHERE account_id = $1", account) == 1


async def test_the_reference_dedupes_and_sorts_repeated_values(hooks: Hooks) -> None:
    """Twilio's scheme: per name, its distinct values sorted (a repeated identical value once)."""
    job_id = await sending_job(hooks.pool)
    target = f"/twilio/status/{job_id}"
    url = hooks.public + target
    fields = [("MessageStatus", "delivered"), ("X", "2"), ("X", "1"), ("X", "2")]
    by_hand = RequestValidator(TOKEN).compute_signature(
        url + "MessageStatusdeliveredX1X2", {})
    assert sign(url, fields) == by_hand
    assert await hooks.post(target, fields, by_hand) == 204
