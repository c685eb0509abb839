"""Opt-outs: the API list, the Twilio inbound STOP/START/HELP webhook, and the bulk lookup."""

from __future__ import annotations

from urllib.parse import quote

import asyncpg
import pytest
from twilio.request_validator import RequestValidator

from dispatcher.api import is_opted_out, record_opt_out
from dispatcher.api.optouts import mask_number, remove_opt_out
from dispatcher.errors import InvalidRecipient, UnknownAccount
from tests.integration.api_fixture import (  # noqa: F401
    TWILIO_AUTH_TOKEN,
    Api,
    api_server,
    bearer,
)

NUMBER = "+442071838750"


def opt_outs_path(api: Api, number: str = "") -> str:
    base = f"/v1/accounts/{api.a.account}/opt-outs"
    return f"{base}/{quote(number)}" if number else base


async def listed(pool: asyncpg.Pool, account: str) -> set[str]:
    return {r["number"] for r in await pool.fetch(
        "SELECT number FROM opt_outs WHERE account_id = $1", account)}


async def test_add_list_remove(api: Api, pool: asyncpg.Pool) -> None:
    owner = bearer(api.a.tokens["service"])
    async with api.client.put(opt_outs_path(api, NUMBER), headers=owner) as resp:
        assert resp.status == 201
        entry = await resp.json()
        assert (entry["number"], entry["source"]) == (NUMBER, "api")
    async with api.client.put(opt_outs_path(api, NUMBER), headers=owner) as resp:
        assert resp.status == 200 and await resp.json() == entry
    async with api.client.get(opt_outs_path(api), headers=bearer(api.a.tokens["member"])) as resp:
        assert (await resp.json()) == {"opt_outs": [entry], "next_cursor": None}
    async with api.client.delete(opt_outs_path(api, NUMBER), headers=owner) as resp:
        assert resp.status == 204
    async with api.client.delete(opt_outs_path(api, NUMBER), headers=owner) as resp:
        assert resp.status == 204
    assert await listed(pool, api.a.account) == set()


async def test_list_pages_by_number(api: Api, pool: asyncpg.Pool) -> None:
    numbers = sorted(f"+4420718387{i:02d}" for i in range(12))
    for number in numbers:
        await record_opt_out(pool, api.a.account, number, "import")
    await record_opt_out(pool, api.b.account, "+33612345678", "import")
    seen: list[str] = []
    cursor = ""
    while True:
        async with api.client.get(opt_outs_path(api), params={"limit": "5", "cursor": cursor},
                                  headers=bearer(api.a.tokens["member"])) as resp:
            page = await resp.json()
        seen += [entry["number"] for entry in page["opt_outs"]]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert seen == numbers


@pytest.mark.parametrize("number", ["4420718387", "+0442071838750", "+44 20", "+4420",
                                    "+1234567890123456"])
async def test_put_rejects_invalid_numbers(api: Api, number: str) -> None:
    async with api.client.put(opt_outs_path(api, number),
                              headers=bearer(api.a.tokens["owner"])) as resp:
        body = await resp.json()
    assert (resp.status, body["error"]["code"]) == (422, "invalid_request")
    assert body["error"]["details"]["errors"][0]["field"] == "number"


def signed(api: Api, path: str, params: dict[str, str],
           token: str = TWILIO_AUTH_TOKEN) -> dict[str, str]:
    signature = RequestValidator(token).compute_signature(api.base_url + path, params)
    return {"X-Twilio-Signature": signature}


async def inbound(api: Api, body: str, sender: str = NUMBER, *, account: str | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    path = f"/twilio/inbound/{account or api.a.account}"
    form = {"From": sender, "To": "+15005550006", "Body": body, "MessageSid": "SM" + "0" * 32}
    async with api.client.post(path, data=form,
                               headers=headers or signed(api, path, form)) as resp:
        return resp.status, resp.content_type, await resp.text()


@pytest.mark.parametrize("word", ["STOP", "stop", "  Unsubscribe \n", "StopAll", "cancel",
                                  "END", "quit", "revoke", "OPTOUT"])
async def test_inbound_stop_opts_out(api: Api, pool: asyncpg.Pool, word: str) -> None:
    status, content_type, text = await inbound(api, word)
    assert (status, content_type) == (200, "text/xml")
    assert "<Response><Message>You have successfully been unsubscribed" in text
    assert await is_opted_out(pool, api.a.account, [NUMBER]) == {NUMBER}
    assert await is_opted_out(pool, api.b.account, [NUMBER]) == set()


@pytest.mark.parametrize("word", ["START", "yes", " unstop "])
async def test_inbound_start_opts_back_in(api: Api, pool: asyncpg.Pool, word: str) -> None:
    await record_opt_out(pool, api.a.account, NUMBER, "inbound")
    status, _, text = await inbound(api, word)
    assert status == 200 and "re-subscribed" in text
    assert await is_opted_out(pool, api.a.account, [NUMBER]) == set()


@pytest.mark.parametrize("word", ["HELP", "info"])
async def test_inbound_help_replies_escaped_xml(api: Api, pool: asyncpg.Pool, word: str) -> None:
    status, _, text = await inbound(api, word)
    assert status == 200 and "Msg &amp; data rates may apply." in text
    assert await listed(pool, api.a.account) == set()


@pytest.mark.parametrize("body", ["please stop", "STOP!", "", "hello"])
async def test_inbound_other_text_changes_nothing(api: Api, pool: asyncpg.Pool,
                                                  body: str) -> None:
    status, _, text = await inbound(api, body)
    assert status == 200 and text.endswith("<Response></Response>")
    assert await listed(pool, api.a.account) == set()


async def test_inbound_forged_signature_is_403_and_changes_nothing(api: Api,
                                                                   pool: asyncpg.Pool) -> None:
    form: dict[str, str] = {"From": NUMBER, "Body": "STOP"}
    path = f"/twilio/inbound/{api.a.account}"
    forgeries: list[dict[str, str]] = [
        {}, {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"},
        signed(api, path, form, token="someone-else"),
        signed(api, f"/twilio/inbound/{api.b.account}", form),
        signed(api, path, {**form, "From": "+33612345678"}),
    ]
    for headers in forgeries:
        status, content_type, text = await inbound(api, "STOP", headers=headers or {"X": "1"})
        assert (status, content_type) == (403, "application/json"), text
    assert await listed(pool, api.a.account) == set()


async def test_inbound_unknown_account_is_404(api: Api) -> None:
    status, _, _ = await inbound(api, "STOP", account="no-such-account")
    assert status == 404


async def test_record_and_lookup_functions(pool: asyncpg.Pool, api: Api) -> None:
    account = api.a.account
    assert await record_opt_out(pool, account, NUMBER, "provider") is True
    assert await record_opt_out(pool, account, NUMBER, "inbound") is False
    assert await is_opted_out(pool, account, []) == set()
    with pytest.raises(InvalidRecipient):
        await record_opt_out(pool, account, "0207", "api")
    with pytest.raises(UnknownAccount):
        await record_opt_out(pool, "no-such-account", NUMBER, "api")
    assert await remove_opt_out(pool, account, NUMBER) is True
    assert mask_number(NUMBER) == "+44********50"


async def test_lookup_of_100k_numbers_finds_exactly_the_opted_out(pool: asyncpg.Pool,
                                                                   api: Api) -> None:
    account = api.a.account
    numbers = [f"+1415{i:07d}" for i in range(100_000)]
    await pool.executemany("INSERT INTO opt_outs (account_id, number, source) "
                           "VALUES ($1, $2, 'import')", [(account, n) for n in numbers[::50]])
    await pool.execute("ANALYZE opt_outs")
    found = await is_opted_out(pool, account, numbers)
    assert found == set(numbers[::50])
