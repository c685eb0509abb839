"""``GET /v1/accounts/{account}/jobs/{job_id}`` and ``dispatcher jobs show``: a job's state,
history, credits and why it waits, tenant-isolated, as the OpenAPI document says."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema_rs
import pytest

import dispatcher.api
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.jobs.store import JobStore, NewJob
from tests.integration.api_fixture import Api, api_server, bearer, make_tenant  # noqa: F401
from tests.integration.test_ledger_cli import cli

DOCUMENT = json.loads(Path(dispatcher.api.__file__).with_name("openapi.json").read_text())
PATH = "/v1/accounts/{account}/jobs/{job_id}"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _validator(status: int) -> jsonschema_rs.Validator:
    response = DOCUMENT["paths"][PATH]["get"]["responses"][str(status)]
    if "$ref" in response:
        response = DOCUMENT["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    return jsonschema_rs.validator_for({**response["content"]["application/json"]["schema"],
                                        "components": DOCUMENT["components"]})


async def get_job(api: Api, account: str, job_id: str, token: str | None,
                  status: int = 200) -> Any:
    headers = bearer(token) if token else {}
    async with api.client.get(f"/v1/accounts/{account}/jobs/{job_id}", headers=headers) as resp:
        body = await resp.json()
        assert resp.status == status, body
    _validator(status).validate(body)
    return body


def new_job(job_id: str, account: str, estimate: int = 2, **payload: Any) -> NewJob:
    return NewJob(job_id, account, "sms", "transactional", {"id": job_id, **payload}, estimate,
                  "US", 1, estimate)


async def waiting_row(pool: asyncpg.Pool, account: str, status: str,
                      not_before: datetime | None = None) -> str:
    """A job as the scheduling and fairness work leaves it: a row, nothing reserved."""
    job_id = uid(status)
    await pool.execute(
        "INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate, "
        "not_before) VALUES ($1, $2, 'sms', 'bulk', $3, $4::jsonb, 2, $5)",
        job_id, account, status, json.dumps({"id": job_id}), not_before)
    return job_id


async def test_a_held_job_says_what_it_waits_for(api: Api, pool: asyncpg.Pool) -> None:
    account = uid("acct")
    await create_account(pool, account, auto_recharge=(True, 5, 100))
    await CreditStore(pool).grant(account, 6, "purchase", uid("pay"))
    jobs = JobStore(pool)
    assert (await jobs.begin(new_job(uid("a"), account, 4))).outcome == "send"  # below 5: low
    first, second = uid("held"), uid("held")
    assert (await jobs.begin(new_job(first, account, 3))).outcome == "held"
    assert (await jobs.begin(new_job(second, account, 2))).outcome == "held"
    view = await get_job(api, account, second, api.operator["member"])
    assert (view["status"], view["final"]) == ("held", False)
    why = view["why"]
    assert why["code"] == "insufficient_credits" and why["until"] is None
    assert why["held"]["available"] == 2 and why["held"]["credits_needed"] == 5
    assert why["held"]["held_ahead"] == 1 and why["held"]["paused_since"] is not None
    assert why["held"]["top_up"]["requested"] is True  # balance.low sent, no grant yet
    assert "top-up was requested" in why["message"]
    # It gives up at the hold limit (72 h) when it has no expires_at of its own.
    created = datetime.fromisoformat(view["created_at"])
    assert datetime.fromisoformat(why["ends_by"]) == created + timedelta(hours=72)
    assert [step["status"] for step in view["history"]] == ["received", "held"]
    assert view["credits"] == {"estimate": 2, "reservation": None, "final_cost": None,
                               "ledger": []}


@pytest.mark.parametrize(("status", "code"), [("scheduled", "scheduled"),
                                              ("deferred", "quiet_hours")])
async def test_a_job_waiting_for_a_time_says_until_when(api: Api, pool: asyncpg.Pool,
                                                        status: str, code: str) -> None:
    when = datetime(2031, 5, 4, 8, 0, tzinfo=UTC)
    job_id = await waiting_row(pool, api.a.account, status, when)
    view = await get_job(api, api.a.account, job_id, api.a.tokens["member"])
    assert view["why"]["code"] == code
    assert datetime.fromisoformat(view["why"]["until"]) == when


async def test_queued_retry_wait_and_sending_jobs_say_why(api: Api, pool: asyncpg.Pool) -> None:
    account = api.a.account
    queued = await waiting_row(pool, account, "queued")
    assert (await get_job(api, account, queued, api.a.tokens["service"]))["why"]["code"] == (
        "fair_share")
    jobs = JobStore(pool)
    retried = uid("retry")
    assert (await jobs.begin(new_job(retried, account))).outcome == "send"
    view = await get_job(api, account, retried, api.a.tokens["owner"])
    assert view["why"]["code"] == "sending"
    assert view["credits"]["reservation"]["status"] == "pending"
    await jobs.retry_later(retried, "provider_rate_limited", 20429, 30)
    view = await get_job(api, account, retried, api.a.tokens["owner"])
    assert view["why"]["code"] == "provider_rate_limited" and view["why"]["until"] is not None
    assert [s["status"] for s in view["history"]] == ["received", "sending", "retry_wait"]


async def test_an_expired_job_says_so_and_charged_nothing(api: Api, pool: asyncpg.Pool) -> None:
    job_id = uid("late")
    expired = datetime.now(UTC) - timedelta(minutes=1)
    begin = await JobStore(pool).begin_expired(new_job(job_id, api.a.account,
                                                       expires_at=expired.isoformat()))
    assert begin.outcome == "expired"
    view = await get_job(api, api.a.account, job_id, api.a.tokens["owner"])
    assert (view["status"], view["reason"], view["final"]) == ("failed", "expired", True)
    assert view["why"]["code"] == "expired"
    assert datetime.fromisoformat(view["expires_at"]) == expired
    assert view["credits"]["final_cost"] == 0 and view["credits"]["reservation"] is None
    assert [(s["status"], s["reason"]) for s in view["history"]] == [
        ("received", None), ("failed", "expired")]


async def test_a_delivered_job_shows_its_history_and_final_charge(api: Api,
                                                                  pool: asyncpg.Pool) -> None:
    jobs, job_id = JobStore(pool), uid("sms")
    assert (await jobs.begin(new_job(job_id, api.a.account, 3))).outcome == "send"
    await jobs.accepted(job_id, "SM" + uuid.uuid4().hex)
    await jobs.provider_status(job_id, None, "delivered", cost=2, settle=True)
    view = await get_job(api, api.a.account, job_id, api.a.tokens["member"])
    assert (view["status"], view["final"], view["why"]) == ("delivered", True, None)
    assert [s["status"] for s in view["history"]] == ["received", "sending", "sent",
                                                      "delivered"]
    credits = view["credits"]
    assert credits["final_cost"] == 2
    assert (credits["reservation"]["amount"], credits["reservation"]["status"],
            credits["reservation"]["captured"]) == (3, "captured", 2)
    assert [(line["kind"], line["amount"]) for line in credits["ledger"]] == [
        ("reserve", 3), ("capture", 2)]


async def test_jobs_are_tenant_isolated(api: Api, pool: asyncpg.Pool) -> None:
    job_id = await waiting_row(pool, api.a.account, "queued")
    # B's token on A's account, and A's job asked for under B's account: both not found.
    refused = await get_job(api, api.a.account, job_id, api.b.tokens["owner"], 404)
    assert refused["error"]["code"] == "not_found"
    refused = await get_job(api, api.b.account, job_id, api.b.tokens["owner"], 404)
    assert refused["error"]["code"] == "not_found"
    assert uid("none") not in json.dumps(refused)
    unknown = await get_job(api, api.a.account, uid("none"), api.a.tokens["owner"], 404)
    assert unknown["error"]["code"] == "not_found"
    anonymous = await get_job(api, api.a.account, job_id, None, 401)
    assert anonymous["error"]["code"] == "unauthenticated"
    revoked_tenant = await make_tenant(pool)
    assert (await get_job(api, revoked_tenant.account, job_id,
                          revoked_tenant.tokens["member"], 404))["error"]["code"] == "not_found"
    for role in ("owner", "admin", "member", "service"):  # every role reads
        assert (await get_job(api, api.a.account, job_id, api.a.tokens[role]))["job_id"] == job_id
    assert (await get_job(api, api.a.account, job_id, api.operator["owner"]))["account"] == (
        api.a.account)


async def test_the_cli_shows_a_job(pool: asyncpg.Pool, database_url: str) -> None:
    account = uid("acct")
    await create_account(pool, account)
    job_id = uid("held")
    assert (await JobStore(pool).begin(new_job(job_id, account, 3,
                                               validity_seconds=60))).outcome == "held"
    code, out = await cli(database_url, "jobs", "show", job_id)
    assert code == 0, out
    assert f"job {job_id}  account {account}" in out
    assert "status: held" in out and "why: insufficient_credits" in out and "received" in out
    code, out = await cli(database_url, "jobs", "show", job_id, "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["job_id"] == job_id and shown["why"]["held"]["credits_needed"] == 3
    code, out = await cli(database_url, "jobs", "show", uid("none"))
    assert code != 0 and "no job" in out


async def test_the_broadcast_api_takes_a_validity(api: Api, pool: asyncpg.Pool) -> None:
    owner = {**bearer(api.a.tokens["owner"])}
    url = f"/v1/accounts/{api.a.account}/broadcasts"
    body = {"body": "Flash sale", "from": "+14155550199",
            "recipients": [{"to": "+447400123456"}]}
    before = datetime.now(UTC)
    async with api.client.post(url, json={**body, "validity_seconds": 900},
                               headers={**owner, "Idempotency-Key": uid("k")}) as resp:
        assert resp.status == 202, await resp.text()
        broadcast_id = (await resp.json())["broadcast_id"]
    expires = await pool.fetchval("SELECT expires_at FROM broadcasts WHERE id = $1",
                                  broadcast_id)
    assert before + timedelta(seconds=900) <= expires <= datetime.now(UTC) + timedelta(
        seconds=900)
    both = {**body, "validity_seconds": 60, "expires_at": "2031-01-01T00:00:00Z"}
    async with api.client.post(url, json=both,
                               headers={**owner, "Idempotency-Key": uid("k")}) as resp:
        assert resp.status == 422
        assert (await resp.json())["error"]["field"] == "validity_seconds"
    naive = {**body, "expires_at": "2031-01-01T00:00:00"}  # no offset: refused
    async with api.client.post(url, json=naive,
                               headers={**owner, "Idempotency-Key": uid("k")}) as resp:
        assert resp.status == 422


async def test_a_broadcast_recipient_not_yet_a_job_says_why(api: Api) -> None:
    owner = bearer(api.a.tokens["owner"])
    url = f"/v1/accounts/{api.a.account}/broadcasts"
    body = {"body": "Hello", "from": "+14155550199", "validity_seconds": 3600,
            "recipients": [{"to": "+447400123456"}, {"to": "+1555"}]}
    async with api.client.post(url, json=body,
                               headers={**owner, "Idempotency-Key": uid("k")}) as resp:
        assert resp.status == 202, await resp.text()
        broadcast_id = (await resp.json())["broadcast_id"]
    # No runner behind this API: the recipients wait for their fan-out.
    pending = await get_job(api, api.a.account, f"{broadcast_id}:0", api.a.tokens["member"])
    assert (pending["status"], pending["final"], pending["broadcast_id"]) == (
        "pending", False, broadcast_id)
    assert pending["why"]["code"] == "broadcast_pending"
    assert pending["why"]["ends_by"] == pending["expires_at"] is not None
    skipped = await get_job(api, api.a.account, f"{broadcast_id}:1", api.a.tokens["member"])
    assert (skipped["status"], skipped["reason"], skipped["why"]["code"]) == (
        "skipped", "invalid", "not_sent")
    assert [s["status"] for s in skipped["history"]] == ["received", "skipped"]
    for job_id in (f"{broadcast_id}:2", f"{broadcast_id}:x", broadcast_id):
        await get_job(api, api.a.account, job_id, api.a.tokens["member"], 404)
    await get_job(api, api.b.account, f"{broadcast_id}:0", api.b.tokens["owner"], 404)


async def test_a_staged_job_says_it_waits_for_its_fair_turn(api: Api,
                                                            pool: asyncpg.Pool) -> None:
    """A delivery staged behind its account's backlog (no jobs row yet) answers `queued`,
    to its own account only."""
    job_id = uid("staged")
    await pool.execute(
        "INSERT INTO staged_jobs (lane, account_id, job_id, kind, body) "
        "VALUES (1, $1, $2, 'sms', '{}'::bytea)", api.a.account, job_id)
    body = await get_job(api, api.a.account, job_id, api.a.tokens["member"])
    assert (body["status"], body["priority"], body["final"]) == ("queued", "bulk", False)
    assert body["why"]["code"] == "fair_share"
    assert body["credits"]["reservation"] is None
    assert [h["status"] for h in body["history"]] == ["received", "queued"]
    refused = await get_job(api, api.b.account, job_id, api.b.tokens["owner"], 404)
    assert refused["error"]["code"] == "not_found"
