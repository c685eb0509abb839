"""Broadcast routes against the real PostgreSQL: roles, tenants, idempotency, pre-flight figures.

No runner here (the app has no dispatcher behind it): submissions are stored, priced and can be
canceled; sending end to end is in test_broadcast_e2e.py. Expected pre-flight figures are
computed in this file from phonenumbers and the GSM 03.38 tables, not by the code under test.
"""

from __future__ import annotations

import io
import json
import math
import uuid
from typing import Any

import asyncpg
import phonenumbers
import pytest

from tests.integration.api_fixture import Api, api_server, bearer  # noqa: F401

WHO = ("owner", "admin", "member", "service", "operator_owner", "operator_member",
       "operator_service")
SENDERS = {"owner", "admin", "service", "operator_owner", "operator_service"}
BODY = "Hi {name}, your code is {code}."
SENDER = "+14155550199"

GSM_BASIC = set("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJ"
                "KLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
GSM_EXTENSION = set("\f^{}\\[~]|€")
FOOTER = "\nReply STOP to unsubscribe"


def sms_parts(text: str) -> int:
    """GSM-7 160/153 (extension characters two septets), else UCS-2 70/67 UTF-16 units."""
    if all(c in GSM_BASIC or c in GSM_EXTENSION for c in text):
        units, single, per_part = sum(1 + (c in GSM_EXTENSION) for c in text), 160, 153
    else:
        units, single, per_part = len(text.encode("utf-16-le")) // 2, 70, 67
    return 1 if units <= single else math.ceil(units / per_part)


def numbers_of(region: str, count: int) -> list[str]:
    """Valid mobile numbers of a region, per phonenumbers."""
    example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
    assert example is not None and example.national_number is not None
    found: list[str] = []
    step = 0
    while len(found) < count:
        step += 1
        candidate = phonenumbers.PhoneNumber(country_code=example.country_code,
                                             national_number=example.national_number + step)
        if phonenumbers.is_valid_number(candidate):
            found.append(phonenumbers.format_number(candidate,
                                                    phonenumbers.PhoneNumberFormat.E164))
    return found


async def call(api: Api, method: str, path: str, token: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    data = None if body is None else io.BytesIO(json.dumps(body).encode())
    async with api.client.request(method, path, data=data,
                                  headers={**bearer(token), **(headers or {})}) as resp:
        parsed = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, parsed, dict(resp.headers)


def broadcast_body(recipients: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"body": BODY, "recipients": recipients, "from": SENDER, **extra}


def simple_recipients(count: int) -> list[dict[str, Any]]:
    return [{"to": n, "vars": {"name": f"N{i}", "code": str(i)}}
            for i, n in enumerate(numbers_of("GB", count))]


async def submit(api: Api, account: str, token: str, body: dict[str, Any],
                 key: str | None = None) -> tuple[int, Any, dict[str, str]]:
    return await call(api, "POST", f"/v1/accounts/{account}/broadcasts", token, body,
                      {"Idempotency-Key": key or f"k-{uuid.uuid4().hex}"})


@pytest.mark.parametrize("who", WHO)
async def test_roles_on_every_broadcast_route(api: Api, who: str) -> None:
    account, token = api.a.account, api.token(who)
    base = f"/v1/accounts/{account}/broadcasts"
    status, _, _ = await call(api, "POST", f"{base}/preflight", token,
                              {"body": BODY, "recipients": simple_recipients(2)})
    assert status == 200
    status, accepted, _ = await submit(api, account, token, broadcast_body(simple_recipients(2)))
    assert status == (202 if who in SENDERS else 403)
    _, owned, _ = await submit(api, account, api.a.tokens["owner"],
                               broadcast_body(simple_recipients(2)))
    status, found, _ = await call(api, "GET", f"{base}/{owned['broadcast_id']}", token)
    assert status == 200 and found["total"] == 2 and found["pending"] == 2
    status, canceled, _ = await call(api, "POST", f"{base}/{owned['broadcast_id']}/cancel", token)
    if who in SENDERS:
        assert status == 200 and canceled["status"] == "canceled" and canceled["canceled"] == 2
    else:
        assert status == 403
        assert accepted["error"]["code"] == "forbidden"


async def test_another_tenant_gets_404_for_everything(api: Api) -> None:
    _, theirs, _ = await submit(api, api.b.account, api.b.tokens["owner"],
                                broadcast_body(simple_recipients(1)))
    their_id = theirs["broadcast_id"]
    mine = api.a.tokens["owner"]
    requests: list[tuple[str, str, Any]] = [
        ("POST", f"/v1/accounts/{api.b.account}/broadcasts/preflight",
         {"body": BODY, "recipients": simple_recipients(1)}),
        ("POST", f"/v1/accounts/{api.b.account}/broadcasts", broadcast_body(simple_recipients(1))),
        ("GET", f"/v1/accounts/{api.b.account}/broadcasts/{their_id}", None),
        ("POST", f"/v1/accounts/{api.b.account}/broadcasts/{their_id}/cancel", None),
        # B's broadcast through A's own account path: still not found
        ("GET", f"/v1/accounts/{api.a.account}/broadcasts/{their_id}", None),
        ("POST", f"/v1/accounts/{api.a.account}/broadcasts/{their_id}/cancel", None),
    ]
    for method, path, body in requests:
        status, error, _ = await call(api, method, path, mine, body, {"Idempotency-Key": "k1"})
        assert (status, error["error"]["code"]) == (404, "not_found"), path
    _, after, _ = await call(api, "GET", f"/v1/accounts/{api.b.account}/broadcasts/{their_id}",
                             api.b.tokens["member"])
    assert after["status"] == "running"


async def test_no_token_is_401(api: Api) -> None:
    async with api.client.post(f"/v1/accounts/{api.a.account}/broadcasts/preflight",
                               json={"body": BODY, "recipients": []}) as resp:
        assert resp.status == 401


async def test_idempotency_key_replays_and_conflicts(api: Api, pool: asyncpg.Pool) -> None:
    account, owner = api.a.account, api.a.tokens["owner"]
    body = broadcast_body(simple_recipients(3))
    first = await submit(api, account, owner, body, key="promo-1")
    again = await submit(api, account, owner, body, key="promo-1")
    assert first[0] == again[0] == 202
    assert again[1] == first[1] and again[2].get("Idempotent-Replayed") == "true"
    assert await pool.fetchval("SELECT count(*) FROM broadcasts WHERE account_id = $1",
                               account) == 1
    status, error, _ = await submit(api, account, owner, {**body, "footer": True}, key="promo-1")
    assert (status, error["error"]["code"]) == (409, "idempotency_conflict")
    status, error, _ = await call(api, "POST", f"/v1/accounts/{account}/broadcasts", owner, body)
    assert (status, error["error"]["code"]) == (400, "idempotency_key_required")


async def test_short_without_auto_recharge_is_refused_and_stores_nothing(
        api: Api, pool: asyncpg.Pool) -> None:
    account, owner = api.a.account, api.a.tokens["owner"]  # 50 subscription credits
    status, error, _ = await submit(api, account, owner, broadcast_body(simple_recipients(60)),
                                    key="short")
    assert status == 409 and error["error"]["code"] == "insufficient_credits"
    details = error["error"]["details"]
    assert details["advice"] == "top_up" and details["shortfall"] == 10
    assert details["preflight"]["credits"] == 60
    assert await pool.fetchval("SELECT count(*) FROM broadcasts WHERE account_id = $1",
                               account) == 0
    status, _, _ = await call(api, "PUT", f"/v1/accounts/{account}/auto-recharge", owner,
                              {"enabled": True, "threshold": 10, "amount": 100})
    assert status == 200
    status, accepted, _ = await submit(api, account, owner,
                                       broadcast_body(simple_recipients(60)), key="short")
    assert status == 202 and accepted["preflight"]["advice"] == "ok_with_auto_recharge"


async def test_validation_errors_are_422_with_the_field(api: Api) -> None:
    account, owner = api.a.account, api.a.tokens["owner"]
    path = f"/v1/accounts/{account}/broadcasts/preflight"
    cases: list[tuple[Any, str]] = [
        ({"body": "x", "recipients": [{"to": 5}]}, "recipients.0.to"),
        ({"body": "x {", "recipients": [{"to": "+14155550100"}]}, "body"),
        ({"body": "x", "recipients": [{"to": "+14155550100", "extra": 1}]}, "recipients.0"),
        ({"body": "x", "recipients": []}, "recipients"),
        ({"body": "x", "recipients": [{"to": "+14155550100", "vars": {"a": "b\x00"}}]},
         "recipients"),
    ]
    for body, field in cases:
        status, error, _ = await call(api, "POST", path, owner, body)
        assert status == 422 and error["error"]["code"] == "invalid_request", body
        assert error["error"]["details"]["errors"][0]["field"] == field, body
    status, error, _ = await submit(api, account, owner,
                                    {"body": "x", "recipients": [{"to": "+14155550100"}]})
    assert status == 422 and error["error"]["details"]["errors"][0]["field"] == "from"


async def test_body_limit_is_the_routes_not_the_apps(api: Api) -> None:
    account, owner = api.a.account, api.a.tokens["owner"]
    recipients = simple_recipients(1) * 30_000  # ~1.7 MB, over the app's 1 MiB default
    status, result, _ = await call(api, "POST", f"/v1/accounts/{account}/broadcasts/preflight",
                                   owner, {"body": BODY, "recipients": recipients})
    assert status == 200 and result["billable"] == 1 and result["skipped"]["duplicate"] == 29_999
    huge = b'{"body": "x", "recipients": [' + b" " * (33 * 1024 * 1024) + b"]}"
    async with api.client.post(f"/v1/accounts/{account}/broadcasts/preflight",
                               data=io.BytesIO(huge),
                               headers=bearer(owner)) as resp:
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "payload_too_large"


async def _mixed_case(api: Api, pool: asyncpg.Pool) -> tuple[list[dict[str, Any]], set[str]]:
    await pool.execute("INSERT INTO rates (channel, country, credits) VALUES "
                       "('sms', 'GB', 5), ('sms', 'US', 4), ('sms', '*', 3) "
                       "ON CONFLICT (channel, country) DO UPDATE SET credits = excluded.credits")
    names = ["Ana", "José", "Łukasz", "李雷", "x" * 150, "Zoë €", "Bob"]
    numbers = [n for region in ("GB", "US", "DE", "IN", "JP") for n in numbers_of(region, 4)]
    recipients: list[dict[str, Any]] = [
        {"to": n, "vars": {"name": names[i % len(names)], "code": str(1000 + i)}}
        for i, n in enumerate(numbers)]
    recipients += [{"to": bad, "vars": {"name": "A", "code": "1"}}
                   for bad in ("+4420", "+999123456789", "447400123456", "+1415555010x")]
    recipients.append({"to": numbers[0], "vars": {"name": "again", "code": "2"}})
    recipients.append({"to": numbers_of("FR", 1)[0], "vars": {"name": "no code"}})
    opted = {numbers[1], numbers[7]}
    for number in opted:
        status, _, _ = await call(api, "PUT", f"/v1/accounts/{api.a.account}/opt-outs/{number}",
                                  api.a.tokens["owner"])
        assert status == 201
    return recipients, opted


async def test_preflight_figures_on_a_mixed_list(api: Api, pool: asyncpg.Pool) -> None:
    recipients, opted = await _mixed_case(api, pool)
    expected: dict[str, dict[str, int]] = {}
    for r in recipients[:20]:
        if r["to"] in opted:
            continue
        region = str(phonenumbers.region_code_for_number(phonenumbers.parse(r["to"])))
        text = f"Hi {r['vars']['name']}, your code is {r['vars']['code']}." + FOOTER
        rate = {"GB": 5, "US": 4}.get(region, 3)
        line = expected.setdefault(region, {"recipients": 0, "segments": 0, "credits": 0,
                                            "rate": rate})
        line["recipients"] += 1
        line["segments"] += sms_parts(text)
        line["credits"] += sms_parts(text) * rate
    credits = sum(line["credits"] for line in expected.values())
    ledger_before = await pool.fetchval("SELECT count(*) FROM ledger")

    status, result, headers = await call(
        api, "POST", f"/v1/accounts/{api.a.account}/broadcasts/preflight",
        api.a.tokens["member"], {"body": BODY, "recipients": recipients, "footer": True})
    assert status == 200 and "Server-Timing" in headers
    assert result["by_country"] == expected
    assert result["credits"] == credits
    assert result["segments"] == sum(line["segments"] for line in expected.values())
    assert result["recipients"] == 26 and result["billable"] == 18
    skipped = result.pop("skipped")
    assert skipped.pop("examples") == [
        {"index": 1, "reason": "opted_out"}, {"index": 7, "reason": "opted_out"},
        {"index": 20, "reason": "invalid"}, {"index": 21, "reason": "invalid"},
        {"index": 22, "reason": "invalid"}, {"index": 23, "reason": "invalid"},
        {"index": 24, "reason": "duplicate"}, {"index": 25, "reason": "missing_variable"}]
    assert skipped == {"invalid": 4, "opted_out": 2, "duplicate": 1, "missing_variable": 1,
                       "country_not_allowed": 0, "price_above_limit": 0}
    assert result["available"] == 50 and result["shortfall"] == credits - 50
    assert result["advice"] == "top_up" and result["auto_recharge"]["covers_shortfall"] is False
    assert await pool.fetchval("SELECT count(*) FROM ledger") == ledger_before
    assert await pool.fetchval("SELECT count(*) FROM reservations WHERE account_id = $1",
                               api.a.account) == 0


@pytest.mark.parametrize(("enabled", "amount", "advice", "top_ups"), [
    (False, 0, "top_up", 0), (False, 500, "enable_auto_recharge", 0),
    (True, 7, "ok_with_auto_recharge", None)])
async def test_advice_follows_the_auto_recharge_settings(
        api: Api, pool: asyncpg.Pool, enabled: bool, amount: int, advice: str,
        top_ups: int | None) -> None:
    account, owner = api.a.account, api.a.tokens["owner"]
    await call(api, "PUT", f"/v1/accounts/{account}/auto-recharge", owner,
               {"enabled": enabled, "threshold": 5, "amount": amount})
    recipients, _ = await _mixed_case(api, pool)
    _, result, _ = await call(api, "POST", f"/v1/accounts/{account}/broadcasts/preflight", owner,
                              {"body": BODY, "recipients": recipients})
    assert result["advice"] == advice
    assert result["auto_recharge"]["covers_shortfall"] is enabled
    shortfall = result["shortfall"]
    assert shortfall > 0
    assert result["auto_recharge"]["top_ups_needed"] == (
        math.ceil(shortfall / amount) if top_ups is None else top_ups)


async def test_static_ucs2_template_and_no_variables(api: Api, pool: asyncpg.Pool) -> None:
    await pool.execute("INSERT INTO rates (channel, country, credits) VALUES ('sms', 'DE', 1) "
                       "ON CONFLICT (channel, country) DO UPDATE SET credits = excluded.credits")
    body = "Привет! " * 10  # 80 UCS-2 units: two parts
    recipients = [{"to": n} for n in numbers_of("DE", 5)]
    _, result, _ = await call(api, "POST", f"/v1/accounts/{api.a.account}/broadcasts/preflight",
                              api.a.tokens["owner"], {"body": body, "recipients": recipients})
    assert result["by_country"] == {"DE": {"recipients": 5, "segments": 10, "credits": 10,
                                           "rate": 1}}
    assert result["advice"] == "ok" and result["shortfall"] == 0
