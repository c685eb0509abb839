"""Over real HTTP, errors say what to do: 405 lists what is allowed, broken JSON says where it
broke, a bad or missing field is named in the error's ``field`` member."""

from __future__ import annotations

import io
import uuid
from typing import Any

import pytest

from tests.integration.api_fixture import Api, api_server, bearer  # noqa: F401


async def post_raw(api: Api, path: str, raw: bytes) -> tuple[int, dict[str, Any]]:
    headers = {**bearer(api.a.tokens["owner"]), "Idempotency-Key": uuid.uuid4().hex,
               "Content-Type": "application/json"}
    async with api.client.post(path, data=io.BytesIO(raw), headers=headers) as resp:
        return resp.status, await resp.json()


async def test_405_carries_allow_and_says_which_methods(api: Api) -> None:
    path = f"/v1/accounts/{api.a.account}/balance"
    async with api.client.delete(path, headers=bearer(api.a.tokens["owner"])) as resp:
        body = await resp.json()
        allow = resp.headers.get("Allow", "")
    assert resp.status == 405 and body["error"]["code"] == "method_not_allowed"
    assert "GET" in {method.strip() for method in allow.split(",")}, allow
    assert "GET" in body["error"]["message"] and "GET" in body["error"]["details"]["allowed"]


@pytest.mark.parametrize("route", ["credits", "broadcasts/preflight"])
async def test_malformed_json_says_line_and_column(api: Api, route: str) -> None:
    raw = b'{\n  "footer": true,\n  "body" "hi"\n}'
    status, body = await post_raw(api, f"/v1/accounts/{api.a.account}/{route}", raw)
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    assert body["error"]["details"] == {"line": 3, "column": 10}, body
    assert "line 3, column 10" in body["error"]["message"]
    assert "JSONDecodeError" not in body["error"]["message"]


@pytest.mark.parametrize(("route", "payload", "field"), [
    ("credits", b'{"kind": "purchase"}', "amount"),
    ("credits", b'{"amount": "five", "kind": "purchase"}', "amount"),
    ("broadcasts/preflight", b'{"body": "hi"}', "recipients"),
    ("broadcasts/preflight", b'{"body": "hi", "recipients": [{"vars": {}}]}',
     "recipients.0.to"),
])
async def test_a_missing_or_bad_field_is_named_in_field(api: Api, route: str, payload: bytes,
                                                        field: str) -> None:
    status, body = await post_raw(api, f"/v1/accounts/{api.a.account}/{route}", payload)
    assert (status, body["error"]["code"]) == (422, "invalid_request")
    assert body["error"]["field"] == field, body
    assert field in body["error"]["message"]
    assert body["error"]["details"]["errors"][0]["field"] == field


async def test_errors_about_no_field_have_a_null_field(api: Api) -> None:
    async with api.client.get(f"/v1/accounts/{api.a.account}/balance") as resp:
        body = await resp.json()
    assert resp.status == 401 and body["error"]["field"] is None
