"""The OpenAPI document: it matches the code and the routes, and the API holds to it under fuzzing.

Schemathesis generates requests (valid and invalid) for every documented operation and sends
them with an owner token to a live server backed by the real PostgreSQL: no 5xx, and every
status, content type and body is the documented one.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema_rs
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import unused_port
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import dispatcher.api
from dispatcher.api.openapi import build_document, render
from dispatcher.credits.ledger import CreditStore
from tests.integration.api_fixture import (  # noqa: F401
    Api,
    api_server,
    bearer,
    build_app,
    make_tenant,
)

DOCUMENT_PATH = Path(dispatcher.api.__file__).with_name("openapi.json")
schema = schemathesis.openapi.from_path(DOCUMENT_PATH)


def test_committed_document_is_current() -> None:
    assert DOCUMENT_PATH.read_text(encoding="utf-8") == render(build_document()), (
        "openapi.json is stale: run `python -m dispatcher.api`")


async def test_every_v1_route_is_documented(api: Api) -> None:
    document = json.loads(DOCUMENT_PATH.read_text(encoding="utf-8"))
    routes = {(route.method.lower(), route.resource.canonical)
              for route in api.client.app.router.routes()
              if route.resource is not None and route.resource.canonical.startswith("/v1/")
              and route.method != "HEAD"}
    documented = {(method, path) for path, ops in document["paths"].items()
                  for method in ops if path.startswith("/v1/")}
    assert routes and routes == documented
    async with api.client.get("/openapi.json") as resp:
        assert resp.status == 200 and await resp.json() == document


def _validator(document: dict[str, Any], path: str, method: str,
               status: int) -> jsonschema_rs.Validator:
    response = document["paths"][path][method]["responses"][str(status)]
    if "$ref" in response:
        response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    root = {**response["content"]["application/json"]["schema"],
            "components": document["components"]}
    return jsonschema_rs.validator_for(root)


async def test_real_responses_match_the_documented_schemas(api: Api) -> None:
    document = json.loads(DOCUMENT_PATH.read_text(encoding="utf-8"))
    account, owner = api.a.account, bearer(api.a.tokens["owner"])
    calls = [
        ("get", "/balance", None, 200), ("get", "/ledger", None, 200),
        ("get", "/auto-recharge", None, 200), ("get", "/opt-outs", None, 200),
        ("post", "/credits", {"amount": 5, "kind": "purchase"}, 201),
        ("post", "/credits", {"amount": -5, "kind": "purchase"}, 422),
        ("put", "/auto-recharge", {"enabled": True, "threshold": 1, "amount": 0}, 422),
        ("get", "/ledger?limit=0", None, 422),
    ]
    for method, suffix, body, status in calls:
        path = f"/v1/accounts/{{account}}{suffix.split('?')[0]}"
        headers = {**owner, "Idempotency-Key": f"k-{suffix}-{status}"}
        async with api.client.request(method, f"/v1/accounts/{account}{suffix}", json=body,
                                      headers=headers) as resp:
            assert resp.status == status
            _validator(document, path, method, status).validate(await resp.json())


async def test_broadcast_responses_match_the_documented_schemas(api: Api) -> None:
    document = json.loads(DOCUMENT_PATH.read_text(encoding="utf-8"))
    account, owner = api.a.account, bearer(api.a.tokens["owner"])
    base = "/v1/accounts/{account}/broadcasts"
    people = [{"to": "+447400123456", "vars": {"n": "Ann"}}, {"to": "+1555", "vars": {}}]
    body = {"body": "Hi {n}", "recipients": people, "from": "+14155550199"}

    async def check(method: str, path: str, url: str, status: int, data: Any = None,
                    key: str | None = None) -> Any:
        headers = {**owner, **({"Idempotency-Key": key} if key else {})}
        async with api.client.request(method, url, json=data, headers=headers) as resp:
            assert resp.status == status
            found = await resp.json()
        _validator(document, path, method, status).validate(found)
        return found

    url = f"/v1/accounts/{account}/broadcasts"
    await check("post", f"{base}/preflight", f"{url}/preflight", 200, body)
    await check("post", f"{base}/preflight", f"{url}/preflight", 422, {"body": 1})
    accepted = await check("post", base, url, 202, body, key="b-1")
    await check("post", base, url, 409, {**body, "recipients": people[:1]}, key="b-1")
    await check("post", base, url, 409, {**body, "recipients": [
        {"to": f"+4474001234{i:02d}", "vars": {"n": "x"}} for i in range(60)]}, key="b-2")
    one = f"{base}/{{broadcast}}"
    broadcast = accepted["broadcast_id"]
    await check("get", one, f"{url}/{broadcast}", 200)
    await check("post", f"{one}/cancel", f"{url}/{broadcast}/cancel", 200)
    await check("get", one, f"{url}/nope", 404)


@dataclass(frozen=True)
class Live:
    """A server on a real port, in its own thread and event loop, for the synchronous fuzzer."""

    url: str
    account: str
    token: str


async def _start(database_url: str) -> tuple[asyncpg.Pool, web.AppRunner, Live]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10, command_timeout=60)
    assert pool is not None
    tenant = await make_tenant(pool, 100)
    await CreditStore(pool).grant(tenant.account, 10**6, "purchase", "PURCHASE-1")
    port = unused_port()
    url = f"http://127.0.0.1:{port}"
    runner = web.AppRunner(build_app(pool, url), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return pool, runner, Live(url, tenant.account, tenant.tokens["owner"])


@pytest.fixture(scope="module")
def live(database_url: str) -> Iterator[Live]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="live-api", daemon=True)
    thread.start()
    pool, runner, server = asyncio.run_coroutine_threadsafe(_start(database_url), loop).result(60)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        asyncio.run_coroutine_threadsafe(pool.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_fail_the_server(case: schemathesis.Case[Any], live: Live) -> None:
    if "account" in case.path_parameters:
        case.path_parameters["account"] = live.account
    case.call_and_validate(
        base_url=live.url, headers=bearer(live.token),
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance])
