"""The account HTTP API against the real PostgreSQL: roles, tenants, idempotency, validation."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from dispatcher.credits.ledger import CreditStore
from dispatcher.tokens import revoke_token
from tests.integration.api_fixture import Api, api_server, bearer  # noqa: F401

WHO = ("owner", "admin", "member", "service", "operator_owner", "operator_member",
       "operator_service")
BILLING = {"owner", "admin", "operator_owner", "operator_admin"}
OPT_OUT_WRITERS = BILLING | {"service", "operator_service"}


def key() -> str:
    return f"key-{uuid.uuid4().hex}"


async def call(api: Api, method: str, path: str, token: str | None, *, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request; returns (status, parsed JSON or None)."""
    sent = {**(bearer(token) if token else {}), **(headers or {})}
    data = None if body is None else json.dumps(body)
    async with api.client.request(method, path, data=data, headers=sent) as resp:
        text = await resp.text()
        parsed = json.loads(text) if resp.content_type == "application/json" else None
        return resp.status, parsed


# (method, path suffix, body, needs Idempotency-Key, who may) -> success status
ENDPOINTS: dict[str, tuple[str, str, Any, bool, set[str] | None, int]] = {
    "balance": ("GET", "/balance", None, False, None, 200),
    "ledger": ("GET", "/ledger?limit=5", None, False, None, 200),
    "get_auto_recharge": ("GET", "/auto-recharge", None, False, None, 200),
    "put_auto_recharge": ("PUT", "/auto-recharge",
                          {"enabled": True, "threshold": 400, "amount": 1000}, False, BILLING, 200),
    "get_messaging_settings": ("GET", "/messaging-settings", None, False, None, 200),
    "put_messaging_settings": ("PUT", "/messaging-settings", {"smart_encoding": True}, False,
                               BILLING, 200),
    "credits": ("POST", "/credits", {"amount": 10, "kind": "purchase"}, True, BILLING, 201),
    "refunds": ("POST", "/refunds", {"purchase_reference": "PURCHASE", "amount": 1}, True,
                BILLING, 201),
    "list_opt_outs": ("GET", "/opt-outs", None, False, None, 200),
    "put_opt_out": ("PUT", "/opt-outs/+442071838750", None, False, OPT_OUT_WRITERS, 201),
    "delete_opt_out": ("DELETE", "/opt-outs/+442071838750", None, False, OPT_OUT_WRITERS, 204),
}


async def request_endpoint(api: Api, pool: asyncpg.Pool, name: str, token: str,
                           account: str) -> tuple[int, Any]:
    method, suffix, body, idempotent, _, _ = ENDPOINTS[name]
    if name == "refunds":
        purchase = f"pay-{uuid.uuid4().hex}"
        await CreditStore(pool).grant(account, 5, "purchase", purchase)
        body = {**body, "purchase_reference": purchase}
    headers = {"Idempotency-Key": key()} if idempotent else None
    return await call(api, method, f"/v1/accounts/{account}{suffix}", token, body=body,
                      headers=headers)


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_roles(api: Api, pool: asyncpg.Pool, endpoint: str, who: str) -> None:
    allowed, success = ENDPOINTS[endpoint][4], ENDPOINTS[endpoint][5]
    status, body = await request_endpoint(api, pool, endpoint, api.token(who), api.a.account)
    if allowed is None or who in allowed:
        assert status == success, body
    else:
        assert status == 403, body
        assert body["error"]["code"] == "forbidden"


@pytest.mark.parametrize("role", ["owner", "member", "service"])
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_other_tenant_is_not_found(api: Api, pool: asyncpg.Pool, endpoint: str,
                                         role: str) -> None:
    status, body = await request_endpoint(api, pool, endpoint, api.a.tokens[role],
                                          api.b.account)
    assert status == 404, body
    assert body["error"]["code"] == "not_found"


@pytest.mark.parametrize("account", ["no-such-account", "bad%20id", "x" * 65])
async def test_unknown_account_is_not_found_even_for_operators(api: Api, account: str) -> None:
    for token in (api.operator["owner"], api.a.tokens["owner"]):
        status, body = await call(api, "GET", f"/v1/accounts/{account}/balance", token)
        assert (status, body["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer nope", "Basic abc",
                                           "Bearer dsp_0123456789abcdef_" + "A" * 43])
async def test_missing_or_invalid_token_is_401(api: Api, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with api.client.get(f"/v1/accounts/{api.a.account}/balance", headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert (await resp.json())["error"]["code"] == "unauthenticated"


async def test_revoked_token_is_401(api: Api, pool: asyncpg.Pool) -> None:
    token = api.a.tokens["member"]
    assert await revoke_token(pool, token.split("_")[1])
    status, body = await call(api, "GET", f"/v1/accounts/{api.a.account}/balance", token)
    assert (status, body["error"]["code"]) == (401, "unauthenticated")


async def test_balance_shows_buckets_pause_and_settings(api: Api, pool: asyncpg.Pool) -> None:
    account = api.a.account
    await CreditStore(pool).grant(account, 30, "purchase", f"pay-{uuid.uuid4().hex}")
    await CreditStore(pool).reserve(f"job-{uuid.uuid4().hex}", account, 60)
    await pool.execute("UPDATE accounts SET paused_at = now() WHERE id = $1", account)
    status, body = await call(api, "GET", f"/v1/accounts/{account}/balance",
                              api.a.tokens["member"])
    assert status == 200
    assert body["buckets"] == {"subscription": 0, "purchased": 20, "debt": 0}
    assert (body["total"], body["reserved"], body["available"]) == (80, 60, 20)
    assert body["paused"] is True and body["paused_since"]
    assert body["auto_recharge"] == {"enabled": False, "threshold": 0, "amount": 0,
                                     "topup_at_zero": True}


async def test_credits_replay_returns_the_same_response_once(api: Api,
                                                             pool: asyncpg.Pool) -> None:
    path, idem = f"/v1/accounts/{api.a.account}/credits", {"Idempotency-Key": key()}
    payload = {"amount": 25, "kind": "purchase", "note": "invoice 7"}
    first = await call(api, "POST", path, api.a.tokens["admin"], body=payload, headers=idem)
    again = await call(api, "POST", path, api.a.tokens["owner"],
                       body={"note": "invoice 7", "kind": "purchase", "amount": 25},
                       headers=idem)
    assert first[0] == 201 and first == again
    assert first[1]["balance"]["buckets"]["purchased"] == 25
    rows = await pool.fetchval("SELECT count(*) FROM ledger WHERE account_id = $1 "
                               "AND kind = 'grant_purchase'", api.a.account)
    assert rows == 1


async def test_concurrent_replays_grant_once(api: Api, pool: asyncpg.Pool) -> None:
    path, idem = f"/v1/accounts/{api.a.account}/credits", {"Idempotency-Key": key()}
    results = await asyncio.gather(*(
        call(api, "POST", path, api.a.tokens["owner"], body={"amount": 7, "kind": "adjustment"},
             headers=idem) for _ in range(8)))
    assert {r[0] for r in results} == {201}
    assert all(r[1] == results[0][1] for r in results)
    balance = await CreditStore(pool).balance(api.a.account)
    assert balance.purchased == 7


async def test_same_key_different_body_is_a_conflict(api: Api) -> None:
    path, idem = f"/v1/accounts/{api.a.account}/credits", {"Idempotency-Key": key()}
    owner = api.a.tokens["owner"]
    assert (await call(api, "POST", path, owner, body={"amount": 5, "kind": "purchase"},
                       headers=idem))[0] == 201
    status, body = await call(api, "POST", path, owner, body={"amount": 6, "kind": "purchase"},
                              headers=idem)
    assert (status, body["error"]["code"]) == (409, "idempotency_conflict")
    refund = {"purchase_reference": "x", "amount": 1}
    status, body = await call(api, "POST", f"/v1/accounts/{api.a.account}/refunds", owner,
                              body=refund, headers=idem)
    assert (status, body["error"]["code"]) == (409, "idempotency_conflict")


@pytest.mark.parametrize(("value", "code"), [(None, "idempotency_key_required"),
                                             ("", "idempotency_key_required"),
                                             ("has space", "invalid_idempotency_key"),
                                             ("k" * 256, "invalid_idempotency_key")])
async def test_idempotency_key_is_required_and_checked(api: Api, value: str | None,
                                                       code: str) -> None:
    headers = {} if value is None else {"Idempotency-Key": value}
    status, body = await call(api, "POST", f"/v1/accounts/{api.a.account}/credits",
                              api.a.tokens["owner"], body={"amount": 5, "kind": "purchase"},
                              headers=headers)
    assert (status, body["error"]["code"]) == (400, code)


async def test_refunds(api: Api, pool: asyncpg.Pool) -> None:
    owner, base = api.a.tokens["owner"], f"/v1/accounts/{api.a.account}"
    _, grant = await call(api, "POST", f"{base}/credits", owner,
                          body={"amount": 100, "kind": "purchase"},
                          headers={"Idempotency-Key": key()})
    purchase, idem = grant["reference"], {"Idempotency-Key": key()}
    body = {"purchase_reference": purchase, "amount": 30}
    first = await call(api, "POST", f"{base}/refunds", owner, body=body, headers=idem)
    assert first[0] == 201 and first[1]["balance"]["buckets"]["purchased"] == 70
    assert await call(api, "POST", f"{base}/refunds", owner, body=body, headers=idem) == first
    status, err = await call(api, "POST", f"{base}/refunds", owner,
                             body={"purchase_reference": purchase, "amount": 71},
                             headers={"Idempotency-Key": key()})
    assert (status, err["error"]["code"], err["error"]["details"]) == (
        409, "refund_too_large", {"refundable": 70})
    status, err = await call(api, "POST", f"{base}/refunds", owner,
                             body={"purchase_reference": "nope", "amount": 1},
                             headers={"Idempotency-Key": key()})
    assert (status, err["error"]["code"]) == (422, "unknown_purchase")
    assert (await CreditStore(pool).balance(api.a.account)).purchased == 70


async def test_ledger_cursor_walks_every_row_once(api: Api, pool: asyncpg.Pool) -> None:
    store = CreditStore(pool)
    for i in range(23):
        await store.grant(api.a.account, i + 1, "adjustment", f"adj-{uuid.uuid4().hex}")
    expected = [r["id"] for r in await pool.fetch(
        "SELECT id FROM ledger WHERE account_id = $1 ORDER BY id", api.a.account)]
    seen: list[int] = []
    cursor: str | None = ""
    while cursor is not None:
        status, page = await call(api, "GET", f"/v1/accounts/{api.a.account}/ledger"
                                  f"?limit=5&cursor={cursor}", api.a.tokens["service"])
        assert status == 200 and len(page["entries"]) <= 5
        seen += [entry["id"] for entry in page["entries"]]
        cursor = page["next_cursor"]
    assert seen == expected and len(expected) == 24  # 23 grants + the first period


@pytest.mark.parametrize("params", ["limit=0", "limit=501", "limit=abc", "cursor=%21%21",
                                    "cursor=bm90LWFuLWlk", "cursor=OTk5OTk5OTk5OTk5OTk5OTk5OQ"])
async def test_ledger_rejects_bad_paging(api: Api, params: str) -> None:
    status, body = await call(api, "GET", f"/v1/accounts/{api.a.account}/ledger?{params}",
                              api.a.tokens["owner"])
    assert (status, body["error"]["code"]) == (422, "invalid_request")
    assert body["error"]["details"]["errors"][0]["field"] in {"limit", "cursor"}


async def test_auto_recharge_update_and_keep_topup_at_zero(api: Api) -> None:
    path, owner = f"/v1/accounts/{api.a.account}/auto-recharge", api.a.tokens["owner"]
    assert (await call(api, "PUT", path, owner, body={
        "enabled": False, "threshold": 0, "amount": 0, "topup_at_zero": False}))[0] == 200
    status, body = await call(api, "PUT", path, owner,
                              body={"enabled": True, "threshold": 400, "amount": 1000})
    assert (status, body) == (200, {"enabled": True, "threshold": 400, "amount": 1000,
                                    "topup_at_zero": False})
    assert await call(api, "GET", path, api.a.tokens["member"]) == (200, body)


@pytest.mark.parametrize(("payload", "field"), [
    ({"enabled": True, "threshold": 400, "amount": 0}, "amount"),
    ({"enabled": True, "threshold": 500, "amount": 100}, "amount"),  # charges in a loop
    ({"enabled": True, "threshold": 500, "amount": 500}, "amount"),
    ({"enabled": True, "threshold": -1, "amount": 5}, "threshold"),
    ({"enabled": True, "threshold": 1, "amount": "5"}, "amount"),
    ({"enabled": 1, "threshold": 1, "amount": 5}, "enabled"),
    ({"enabled": False, "threshold": 1, "amount": 10**13}, "amount"),
    ({"enabled": False, "threshold": 1}, "amount"),
    ({"enabled": False, "threshold": 1, "amount": 1, "extra": 1}, "extra"),
])
async def test_auto_recharge_validation(api: Api, payload: dict[str, Any], field: str) -> None:
    status, body = await call(api, "PUT", f"/v1/accounts/{api.a.account}/auto-recharge",
                              api.a.tokens["admin"], body=payload)
    assert (status, body["error"]["code"]) == (422, "invalid_request")
    assert [e["field"] for e in body["error"]["details"]["errors"]] == [field]


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"{", 400, "invalid_json"), (b"\xff\xfe", 400, "invalid_json"),
    (b'{"amount": NaN, "kind": "purchase"}', 400, "invalid_json"),
    (b"[" * 100_000, 400, "invalid_json"), (b"[]", 422, "invalid_request"),
    (b'{"amount": 1, "kind": "purchase", "note": "a\\u0000b"}', 422, "invalid_request"),
    (b'{"amount": 1, "kind": "purchase", "note": "\\ud800"}', 422, "invalid_request"),
    (b'{"amount": 1.0, "kind": "purchase"}', 422, "invalid_request"),
    (b'{"amount": 1, "kind": "gift"}', 422, "invalid_request"),
    (b" " * (1024 * 1024 + 1), 413, "payload_too_large"),
])
async def test_bad_bodies_never_500(api: Api, raw: bytes, status: int, code: str) -> None:
    headers = {**bearer(api.a.tokens["owner"]), "Idempotency-Key": key()}
    async with api.client.post(f"/v1/accounts/{api.a.account}/credits", data=io.BytesIO(raw),
                               headers=headers) as resp:
        body = await resp.json()
    assert (resp.status, body["error"]["code"]) == (status, code)


async def test_chunked_body_too_large_is_413(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b" " * 65536

    headers = {**bearer(api.a.tokens["owner"]), "Idempotency-Key": key()}
    async with api.client.post(f"/v1/accounts/{api.a.account}/credits", data=chunks(),
                               headers=headers) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "payload_too_large"


async def test_unknown_route_and_method_are_json(api: Api) -> None:
    owner = api.a.tokens["owner"]
    status, body = await call(api, "GET", f"/v1/accounts/{api.a.account}/nothing", owner)
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = await call(api, "DELETE", f"/v1/accounts/{api.a.account}/balance", owner)
    assert (status, body["error"]["code"]) == (405, "method_not_allowed")
