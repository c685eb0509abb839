"""No job state without an owner, and no resend without certainty (issue 12).

Every unfinished state survives a crash at any point: a ``retry_wait`` job is sent when due by
the retry sweeper, whoever decided the retry and whatever happened to that process. A job left
``sending`` by a crash is sent again only when a complete search of the provider's lists finds
nothing it could have become; a call the provider holds that cannot be told apart from another
one stays ``unknown`` for an operator, its credits reserved.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any

import asyncpg

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.jobs.contract import encode_job, parse_job
from dispatcher.jobs.store import JobStore, NewJob
from dispatcher.sandbox.state import NumberRule
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import RunningDispatcher, running_dispatcher, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

SENDER = "+14155550199"
TWIML = "<Response><Say>Your code is 1234</Say></Response>"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def funded(pool: asyncpg.Pool, credits: int) -> str:
    account = uid("acct")
    await create_account(pool, account)
    if credits:
        await CreditStore(pool).grant(account, credits, "purchase", uid("pay"))
    return account


async def begin_orphan(pool: asyncpg.Pool, account: str, job: dict[str, Any]) -> str:
    """A job as a crashed process leaves it: reserved and `sending`, its send never recorded."""
    raw = json.dumps({"schema_version": 1, "account": account, **job}).encode()
    stored = encode_job(parse_job(raw)).decode()
    begin = await JobStore(pool).begin(NewJob(job["id"], account, job["kind"], "transactional",
                                              stored, 2, "US", 1, 2))
    assert begin.outcome == "send"
    return str(job["id"])


async def status_of(pool: asyncpg.Pool, job_id: str) -> str:
    return str(await pool.fetchval("SELECT status FROM jobs WHERE job_id = $1", job_id))


async def wait_status(pool: asyncpg.Pool, job_id: str, *statuses: str,
                      timeout: float = 20.0) -> None:
    async def reached() -> bool:
        return await status_of(pool, job_id) in statuses
    reached.__qualname__ = f"job {job_id} reaches {statuses}"
    await wait_for(reached, timeout=timeout)


async def make_stale(pool: asyncpg.Pool, job_id: str) -> None:
    """Past the reconciler's grace at once (the send itself began when the job was claimed)."""
    await pool.execute("UPDATE jobs SET updated_at = now() - interval '1 hour' WHERE job_id = $1",
                       job_id)


async def unresolved_cli(settings: Settings) -> str:
    env = {**os.environ, "DISPATCHER_DATABASE_URL": settings.database_url,
           "DISPATCHER_LOG_LEVEL": "warning"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher", "jobs", "unresolved", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


# --- retry_wait is owned by the retry sweeper ---------------------------------------------------

async def test_a_retry_committed_just_before_a_crash_is_sent_once_by_a_fresh_service(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    """The reconciler found the crashed job was never sent and committed `retry_wait`; the
    process died before anything else happened. Nothing in memory survives: a fresh service
    must still send it, once."""
    to = "+14155550131"
    account = await funded(pool, 10)
    job_id = await begin_orphan(pool, account, {"id": uid("crashed"), "kind": "sms", "to": to,
                                                "from": SENDER, "body": "never sent"})
    # The decision is committed; the work that was to follow it in-process is lost.
    assert await JobStore(pool).retry_later(job_id, "not_sent_before_crash", None) == "retry_wait"

    listed = [line for line in (await unresolved_cli(settings)).splitlines()
              if line.startswith(job_id)]
    assert [line.split("\t")[3] for line in listed] == ["retry_wait"]

    async with running_dispatcher(settings, twilio_sandbox, pool) as d:
        await wait_status(pool, job_id, "sent", "delivered")
        await d.sandbox.wait_callbacks()
        await asyncio.sleep(1.0)  # room for a wrongful second send
        assert len(d.sandbox.state.creates(to=to)) == 1
        await wait_status(pool, job_id, "delivered")
    assert await run_audit(pool) == []


async def test_a_429_on_a_job_the_resumer_released_is_sent_later_exactly_once(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    to = "+14155550132"
    d.sandbox.state.set_rule(to, NumberRule(error_code=20429, fail_times=1))
    account = await d.funded_account(uid("acct"), 0)
    job_id = uid("released")
    await d.publish_sms(job_id, account, to=to, body="held, then rate limited")
    await wait_status(d.pool, job_id, "held")

    await CreditStore(d.pool).grant(account, 5, "purchase", uid("pay"))
    await wait_status(d.pool, job_id, "delivered")
    creates = d.sandbox.state.creates(to=to)
    assert [c.outcome for c in creates] == ["refused", "accepted"]
    assert await d.pool.fetchval("SELECT paused_at FROM accounts WHERE id = $1", account) is None
    assert await run_audit(d.pool) == []


async def test_a_429_on_a_broadcast_recipient_is_sent_later_and_the_broadcast_completes(
        dispatcher: RunningDispatcher) -> None:
    d = dispatcher
    numbers = ["+14155550133", "+14155550134", "+14155550135"]
    d.sandbox.state.set_rule(numbers[1], NumberRule(error_code=20429, fail_times=1))
    account = await d.funded_account(uid("acct"), 20)
    broadcast_id = uid("bc")
    await d.publisher.publish({"schema_version": 1, "id": broadcast_id, "kind": "broadcast",
                               "account": account, "from": SENDER, "body": "Sale today",
                               "recipients": [{"to": n} for n in numbers]})

    async def completed() -> bool:
        return await d.pool.fetchval("SELECT status FROM broadcasts WHERE id = $1",
                                     broadcast_id) == "completed"
    await wait_for(completed, timeout=30)
    for number in numbers:
        accepted = d.sandbox.state.creates(to=number, accepted=True)
        assert len(accepted) == 1, number
    assert [c.outcome for c in d.sandbox.state.creates(to=numbers[1])] == ["refused", "accepted"]
    await d.sandbox.wait_callbacks()
    assert await run_audit(d.pool) == []


# --- a resend only after a complete search --------------------------------------------------------

async def test_an_orphaned_sms_behind_more_than_a_page_of_newer_messages_is_not_sent_again(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    """Twilio lists newest first, 50 to a page by default: the crashed job's message is on the
    second page, and only reading every page of its window finds it."""
    to, body = "+14155550136", "Your order 1234 has shipped"
    twilio_sandbox.state.configure(callbacks_enabled=False)
    account = await funded(pool, 10)
    job_id = await begin_orphan(pool, account, {"id": uid("orphan"), "kind": "sms", "to": to,
                                                "from": SENDER, "body": body})
    client = twilio_sandbox.client()
    # The create reached Twilio; the process died before recording it.
    orphan = await client.messages.create_async(to=to, from_=SENDER, body=body)
    for i in range(60):
        await client.messages.create_async(to=to, from_=SENDER, body=f"newer message {i}")
    await make_stale(pool, job_id)

    async with running_dispatcher(settings, twilio_sandbox, pool):
        await wait_status(pool, job_id, "sent", "delivered")
        await asyncio.sleep(1.0)
    assert await pool.fetchval("SELECT provider_sid FROM jobs WHERE job_id = $1",
                               job_id) == orphan.sid
    assert [c.body for c in twilio_sandbox.state.creates(to=to)].count(body) == 1
    assert len(twilio_sandbox.state.creates(to=to)) == 61


async def test_an_orphaned_call_behind_more_than_a_page_of_newer_calls_is_not_placed_again(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    """A call has no body to match: the crashed job's call is the one call between its numbers
    that no other job owns. The 60 newer ones were placed (and bound) by the dispatcher."""
    to = "+14155550137"
    account = await funded(pool, 200)
    job_id = await begin_orphan(pool, account, {"id": uid("orphan"), "kind": "call", "to": to,
                                                "from": SENDER, "twiml": TWIML,
                                                "max_minutes": 1})
    client = twilio_sandbox.client()
    orphan = await client.calls.create_async(to=to, from_=SENDER, twiml=TWIML)
    # Kept away from the reconciler until the newer calls are placed.
    await pool.execute("UPDATE jobs SET updated_at = now() + interval '1 hour' WHERE job_id = $1",
                       job_id)

    async with running_dispatcher(settings, twilio_sandbox, pool) as d:
        newer = [uid("newer") for _ in range(60)]
        for newer_id in newer:
            await d.publisher.publish({"schema_version": 1, "id": newer_id, "kind": "call",
                                       "account": account, "to": to, "from": SENDER,
                                       "twiml": TWIML, "max_minutes": 1})

        async def all_bound() -> bool:
            return await pool.fetchval(
                "SELECT count(*) FROM jobs WHERE job_id = ANY($1) AND provider_sid IS NOT NULL",
                newer) == len(newer)
        await wait_for(all_bound, timeout=30)
        await make_stale(pool, job_id)
        await wait_status(pool, job_id, "sent", "delivered")
        await asyncio.sleep(1.0)
    assert await pool.fetchval("SELECT provider_sid FROM jobs WHERE job_id = $1",
                               job_id) == orphan.sid
    assert len(twilio_sandbox.state.creates(to=to)) == 61


async def test_a_call_that_cannot_be_identified_stays_unknown_with_its_credits_reserved(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    """Two calls between the job's numbers that no job owns (one placed by another system):
    either could be the crashed job's. Neither is bound, and nothing is placed again."""
    to = "+14155550138"
    account = await funded(pool, 10)
    job_id = await begin_orphan(pool, account, {"id": uid("orphan"), "kind": "call", "to": to,
                                                "from": SENDER, "twiml": TWIML,
                                                "max_minutes": 1})
    client = twilio_sandbox.client()
    await client.calls.create_async(to=to, from_=SENDER, twiml=TWIML)
    await client.calls.create_async(to=to, from_=SENDER, url="https://example.com/other.xml")
    await make_stale(pool, job_id)

    async with running_dispatcher(settings, twilio_sandbox, pool) as d:
        await wait_status(pool, job_id, "unknown")
        await asyncio.sleep(1.5)  # a few more reconcile passes: still nothing decided
        assert await status_of(pool, job_id) == "unknown"
        assert len(d.sandbox.state.creates(to=to)) == 2
    job = await pool.fetchrow("SELECT provider_sid, reason FROM jobs WHERE job_id = $1", job_id)
    assert job is not None
    assert job["provider_sid"] is None and job["reason"] == "provider_lookup_ambiguous"
    assert await pool.fetchval("SELECT status FROM reservations WHERE job_id = $1",
                               job_id) == "pending"
    assert await pool.fetchval("SELECT reserved FROM accounts WHERE id = $1", account) == 2
    assert await run_audit(pool) == []
