"""The sandbox speaks Twilio's published REST shape: its bodies validate against Twilio's OpenAPI.

The reference is ``shared/twilio/twilio_api_v2010.json`` (Twilio's own OpenAPI 3.0 description,
unmodified). Every field Twilio documents for a Message or Call must be present, nothing
undocumented may be added, types and enum values must match, and every form parameter the
sandbox reads must be one Twilio documents for that request.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

import dispatcher.sandbox.app as sandbox_app
from dispatcher.twilio.http import basic_auth
from tests.integration.sandbox_fixture import SandboxHandle

SPEC_PATH = Path(__file__).resolve().parents[3] / "shared" / "twilio" / "twilio_api_v2010.json"
MESSAGES = "/2010-04-01/Accounts/{AccountSid}/Messages.json"
CALLS = "/2010-04-01/Accounts/{AccountSid}/Calls.json"
SENDER = "+15005550006"
TO = "+447700900123"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    if not SPEC_PATH.exists():
        pytest.fail(f"Twilio's OpenAPI description is missing at {SPEC_PATH} (shared/twilio/)")
    loaded: dict[str, Any] = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    return loaded


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0 → JSON Schema: ``nullable`` becomes a null alternative, objects are closed."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _json_schema(value) for key, value in node.items()
           if key not in {"nullable", "x-twilio", "description", "format"}}
    if node.get("type") == "object" and "properties" in node:
        out["required"] = sorted(node["properties"])
        out["additionalProperties"] = False
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    root = {**schema, "components": _json_schema(spec["components"])}
    return jsonschema.Draft7Validator(root)


def response_schema(spec: dict[str, Any], path: str, method: str, status: str) -> dict[str, Any]:
    content = spec["paths"][path][method]["responses"][status]["content"]["application/json"]
    schema: dict[str, Any] = _json_schema(content["schema"])
    return schema


def request_params(spec: dict[str, Any], path: str) -> set[str]:
    body = spec["paths"][path]["post"]["requestBody"]["content"]
    return set(body["application/x-www-form-urlencoded"]["schema"]["properties"])


def assert_valid(spec: dict[str, Any], schema: dict[str, Any], body: Any) -> None:
    errors = sorted(validator(spec, schema).iter_errors(body), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


async def post(sandbox: SandboxHandle, resource: str, form: dict[str, str]) -> Any:
    url = f"{sandbox.base_url}/2010-04-01/Accounts/{sandbox.account_sid}/{resource}"
    headers = {"Authorization": basic_auth(sandbox.account_sid, sandbox.auth_token)}
    async with aiohttp.ClientSession() as session, session.post(
            url, data=form, headers=headers) as response:
        assert response.status == 201, await response.text()
        return await response.json()


async def get(sandbox: SandboxHandle, path: str) -> Any:
    headers = {"Authorization": basic_auth(sandbox.account_sid, sandbox.auth_token)}
    async with aiohttp.ClientSession() as session, session.get(
            sandbox.base_url + path, headers=headers) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_created_message_matches_twilios_message_schema(
        spec: dict[str, Any], twilio_sandbox: SandboxHandle) -> None:
    body = await post(twilio_sandbox, "Messages.json",
                      {"To": TO, "From": SENDER, "Body": "héllo ☃",
                       "StatusCallback": "http://127.0.0.1:9/status/j1"})
    assert_valid(spec, response_schema(spec, MESSAGES, "post", "201"), body)
    fetched = await get(twilio_sandbox, body["uri"])
    assert_valid(spec, response_schema(spec, MESSAGES, "post", "201"), fetched)


async def test_created_call_matches_twilios_call_schema(
        spec: dict[str, Any], twilio_sandbox: SandboxHandle) -> None:
    body = await post(twilio_sandbox, "Calls.json",
                      {"To": TO, "From": SENDER, "Url": "https://example.com/twiml",
                       "TimeLimit": "120", "StatusCallback": "http://127.0.0.1:9/status/j2"})
    assert_valid(spec, response_schema(spec, CALLS, "post", "201"), body)


async def test_lists_match_twilios_list_schemas(
        spec: dict[str, Any], twilio_sandbox: SandboxHandle) -> None:
    await post(twilio_sandbox, "Messages.json", {"To": TO, "From": SENDER, "Body": "hi"})
    await post(twilio_sandbox, "Calls.json", {"To": TO, "From": SENDER, "Twiml": "<Response/>"})
    base = f"/2010-04-01/Accounts/{twilio_sandbox.account_sid}"
    messages = await get(twilio_sandbox, f"{base}/Messages.json")
    calls = await get(twilio_sandbox, f"{base}/Calls.json")
    assert len(messages["messages"]) == 1
    assert len(calls["calls"]) == 1
    assert_valid(spec, response_schema(spec, MESSAGES, "get", "200"), messages)
    assert_valid(spec, response_schema(spec, CALLS, "get", "200"), calls)


def test_every_form_parameter_the_sandbox_reads_is_documented(spec: dict[str, Any]) -> None:
    source = Path(sandbox_app.__file__).read_text(encoding="utf-8")
    read: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"get", "getall"}
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "form"
                and node.args and isinstance(node.args[0], ast.Constant)):
            read.add(str(node.args[0].value))
    documented = request_params(spec, MESSAGES) | request_params(spec, CALLS)
    assert {"To", "From", "Body", "StatusCallback", "TimeLimit"} <= read
    assert read <= documented, f"undocumented parameters: {sorted(read - documented)}"


async def test_the_check_catches_drift(spec: dict[str, Any],
                                       twilio_sandbox: SandboxHandle) -> None:
    body = await post(twilio_sandbox, "Messages.json", {"To": TO, "From": SENDER, "Body": "hi"})
    schema = response_schema(spec, MESSAGES, "post", "201")
    drifted = [{**body, "segments": 1}, {k: v for k, v in body.items() if k != "num_segments"},
               {**body, "status": "done"}, {**body, "error_code": "30007"}]
    for wrong in drifted:
        assert list(validator(spec, schema).iter_errors(wrong)), wrong
