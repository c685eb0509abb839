"""Smart Encoding and grapheme-aware segments where money is quoted: settings, pre-flight, sends.

Expected figures are worked out here by hand (GSM-7 160/153, UCS-2 70/67 UTF-16 units, a part
never splitting a grapheme cluster), not by the code under test.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.integration.api_fixture import Api, api_server  # noqa: F401
from tests.integration.dispatcher_fixture import RunningDispatcher, wait_for
from tests.integration.test_api_broadcasts import WHO, call, numbers_of
from tests.integration.test_broadcast_e2e import client_for
from tests.integration.test_ledger_cli import cli
from tests.integration.test_pipeline import wait_status

CURLY = "\u201cHi\u201d \u2014 it\u2019s ready\u2026 "  # 19 characters, 4 outside GSM-7
SMART = "\"Hi\" - it's ready... "  # what Smart Encoding makes of it: 21 GSM-7 septets
FLAG = "\U0001f1ec\U0001f1e7"  # one cluster of 4 UTF-16 units


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def de_rate(pool: asyncpg.Pool) -> int:
    await pool.execute("INSERT INTO rates (channel, country, credits) VALUES ('sms', 'DE', 1) "
                       "ON CONFLICT (channel, country) DO UPDATE SET credits = excluded.credits")
    return 1


async def settings_of(api: Api, who: str) -> tuple[int, Any]:
    status, body, _ = await call(api, "GET", f"/v1/accounts/{api.a.account}/messaging-settings",
                                 api.token(who))
    return status, body


@pytest.mark.parametrize("who", WHO)
async def test_only_owners_and_admins_change_smart_encoding(api: Api, who: str) -> None:
    assert await settings_of(api, "member") == (200, {"smart_encoding": False})  # the default
    status, body, _ = await call(api, "PUT", f"/v1/accounts/{api.a.account}/messaging-settings",
                                 api.token(who), {"smart_encoding": True})
    allowed = who in ("owner", "admin", "operator_owner")
    assert status == (200 if allowed else 403), body
    assert await settings_of(api, "member") == (200, {"smart_encoding": allowed})


async def test_another_tenant_cannot_change_it(api: Api) -> None:
    status, _, _ = await call(api, "PUT", f"/v1/accounts/{api.a.account}/messaging-settings",
                              api.b.tokens["owner"], {"smart_encoding": True})
    assert status in (403, 404)
    assert await settings_of(api, "owner") == (200, {"smart_encoding": False})


async def preflight(api: Api, body: str, recipients: list[dict[str, Any]]) -> dict[str, Any]:
    status, result, _ = await call(api, "POST",
                                   f"/v1/accounts/{api.a.account}/broadcasts/preflight",
                                   api.a.tokens["member"], {"body": body, "recipients": recipients})
    assert status == 200, result
    return dict(result)


async def test_preflight_names_the_ucs2_characters_and_the_savings(
        api: Api, de_rate: int) -> None:
    body = CURLY * 8  # 152 characters: UCS-2, 3 parts; 168 septets once encoded: 2 parts
    people = [{"to": n} for n in numbers_of("DE", 3)]
    off = await preflight(api, body, people)
    assert (off["smart_encoding"], off["segments"], off["credits"]) == (False, 9, 9)
    assert [c["code_point"] for c in off["ucs2_characters"]] == [
        "U+201C", "U+201D", "U+2014", "U+2019", "U+2026"]
    assert off["ucs2_characters"][0] == {
        "character": "\u201c", "code_point": "U+201C", "name": "LEFT DOUBLE QUOTATION MARK",
        "smart_encodable": True}
    # Without them: 152 - 40 = 112 GSM-7 characters, one part each.
    assert off["savings"] == 9 - 3

    status, _, _ = await call(api, "PUT", f"/v1/accounts/{api.a.account}/messaging-settings",
                              api.a.tokens["admin"], {"smart_encoding": True})
    assert status == 200
    on = await preflight(api, body, people)
    assert (on["smart_encoding"], on["segments"], on["credits"]) == (True, 6, 6)
    assert on["ucs2_characters"] == [] and on["savings"] == 0


async def test_preflight_per_recipient_values_are_encoded_too(api: Api, de_rate: int) -> None:
    await call(api, "PUT", f"/v1/accounts/{api.a.account}/messaging-settings",
               api.a.tokens["owner"], {"smart_encoding": True})
    [plain, curly, emoji] = numbers_of("DE", 3)
    result = await preflight(api, "a" * 150 + "{x}", [
        {"to": plain, "vars": {"x": "bcdefghij"}},  # 159 septets: 1
        {"to": curly, "vars": {"x": "\u201cdef\u201d\u2026"}},  # 150 + 8 = 158: 1
        {"to": emoji, "vars": {"x": "\U0001f600\u2019"}}])  # UCS-2, 153 units: 3
    assert result["segments"] == 5
    assert [c["character"] for c in result["ucs2_characters"]] == ["\U0001f600"]
    assert result["ucs2_characters"][0]["smart_encodable"] is False
    assert result["savings"] == 2  # without the emoji: 151 septets, one part


async def test_preflight_keeps_a_cluster_whole_at_a_part_boundary(
        api: Api, de_rate: int) -> None:
    # 65 + 4 + 65 = 134 units: splitting the flag would fit two parts; whole, it takes three.
    people = [{"to": n, "vars": {"flag": FLAG}} for n in numbers_of("DE", 2)]
    result = await preflight(api, "x" * 65 + "{flag}" + "y" * 65, people)
    assert result["segments"] == 6 and result["credits"] == 6
    static = await preflight(api, "ж" * 66 + "e\u0301" + "ж" * 66, [{"to": people[0]["to"]}])
    assert static["segments"] == 3


async def test_cli_turns_it_on_and_off(pool: asyncpg.Pool, database_url: str) -> None:
    account = f"se-{uuid.uuid4().hex[:8]}"
    assert (await cli(database_url, "accounts", "create", account))[0] == 0
    assert await cli(database_url, "accounts", "smart-encoding", account, "on") == (
        0, f"smart encoding on for {account}\n")
    assert await pool.fetchval("SELECT smart_encoding FROM accounts WHERE id = $1", account)
    assert (await cli(database_url, "accounts", "smart-encoding", account, "off"))[0] == 0
    assert not await pool.fetchval("SELECT smart_encoding FROM accounts WHERE id = $1", account)
    code, out = await cli(database_url, "accounts", "smart-encoding", "no-such-acct", "on")
    assert code != 0 and "no-such-acct" in out


async def test_an_sms_is_priced_and_sent_smart_encoded(dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    plain = await d.funded_account(f"se-{uuid.uuid4().hex[:8]}", 10)
    smart = await d.funded_account(f"se-{uuid.uuid4().hex[:8]}", 10)
    await d.pool.execute("UPDATE accounts SET smart_encoding = true WHERE id = $1", smart)
    body = CURLY * 4  # 76 UCS-2 units: 2 parts; 84 septets once encoded: 1
    for account, to in ((plain, "+14155550181"), (smart, "+14155550182")):
        await d.publish_sms(f"{account}-1", account, to=to, body=body)
    sent_plain = await wait_status(d, f"{plain}-1", "delivered")
    sent_smart = await wait_status(d, f"{smart}-1", "delivered")
    assert (sent_plain["units"], sent_smart["units"]) == (2, 1)
    # Stored as it is sent, for a send after a hold too.
    assert json.loads(str(sent_smart["payload"]))["body"] == SMART * 4
    # A flag across the 67-unit boundary moves whole: three parts reserved, not two.
    await d.publish_sms(f"{plain}-flag", plain, to="+14155550183",
                        body="x" * 65 + FLAG + "y" * 65)
    flagged = await wait_status(d, f"{plain}-flag", "delivered", "sent")
    assert flagged["units"] == 3 and flagged["estimate"] == 3 * flagged["rate"]
    [create_plain] = d.sandbox.state.creates(to="+14155550181", accepted=True)
    [create_smart] = d.sandbox.state.creates(to="+14155550182", accepted=True)
    assert create_plain.body == body and create_smart.body == SMART * 4


async def test_a_broadcast_is_sent_as_it_was_priced(
        dispatcher: RunningDispatcher, session: aiohttp.ClientSession) -> None:
    client = await client_for(dispatcher, session, 100)
    await dispatcher.pool.execute("UPDATE accounts SET smart_encoding = true WHERE id = $1",
                                  client.account)
    people = [{"to": n, "vars": {"name": f"Zo\u00eb \u2018{i}\u2019"}}
              for i, n in enumerate(numbers_of("US", 3))]
    status, accepted = await client.request(
        "POST", "/broadcasts", {"body": "Hello {name} \u2014 see you\u2026",
                                "recipients": people, "from": "+14155550199"},
        key=uuid.uuid4().hex)
    assert status == 202, accepted
    assert accepted["preflight"]["smart_encoding"] is True
    assert [c["character"] for c in accepted["preflight"]["ucs2_characters"]] == ["\u00eb"]

    async def all_sent() -> bool:
        return len(dispatcher.sandbox.state.creates(accepted=True)) >= 3

    await wait_for(all_sent, timeout=60)
    bodies = sorted(c.body or "" for c in dispatcher.sandbox.state.creates(accepted=True))
    assert bodies == [f"Hello Zo\u00eb '{i}' - see you..." for i in range(3)]
