"""A broadcast's kept progress counts equal a recount of its rows after every kind of change."""

from __future__ import annotations

import json
import uuid

import asyncpg

from dispatcher.broadcasts.runner import BroadcastRunner, Broadcasts
from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.rates import RateCache
from dispatcher.credits.subscriptions import create_account
from dispatcher.jobs.contract import BroadcastJob
from dispatcher.jobs.outcomes import Done, Outcome
from dispatcher.jobs.store import Claim, JobStore
from dispatcher.queries import q
from tests.integration.test_api_broadcasts import numbers_of


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def counts(pool: asyncpg.Pool, broadcast_id: str) -> dict[str, int]:
    """The kept counts, asserted equal to a recount."""
    kept = await pool.fetchrow(q("broadcast_progress"), broadcast_id)
    recount = await pool.fetchrow(q("broadcast_recount"), broadcast_id)
    assert kept is not None and recount is not None
    assert dict(kept) == dict(recount)
    return dict(kept)


async def a_broadcast(pool: asyncpg.Pool, credits: int,
                      people: int) -> tuple[str, str, BroadcastRunner, list[str]]:
    """An account with ``credits``, a stored broadcast to ``people`` (one invalid number more),
    and a runner whose sends only record the job ids."""
    account = uid("acct")
    await create_account(pool, account)
    await CreditStore(pool).grant(account, credits, "purchase", uid("pay"))
    rates = RateCache(pool)
    recipients = [{"to": n} for n in numbers_of("US", people)] + [{"to": "+10000000000"}]
    job = BroadcastJob.model_validate({
        "schema_version": 1, "id": uid("b"), "kind": "broadcast", "account": account,
        "from": "+14155550199", "body": "Sale today", "recipients": recipients})
    broadcast_id = uid("bc")
    _, stored = await Broadcasts(pool, rates).submit(broadcast_id, job, refuse_if_short=False)
    assert stored
    sent: list[str] = []

    async def send(payload: bytes, attempt: int, wanted: object) -> Outcome:
        sent.append(json.loads(payload)["id"])
        return Done("sent")

    return account, broadcast_id, BroadcastRunner(pool, rates, send, batch=4, window=8), sent


async def step(pool: asyncpg.Pool, runner: BroadcastRunner, broadcast_id: str) -> bool:
    row = await pool.fetchrow("SELECT * FROM broadcasts WHERE id = $1", broadcast_id)
    worked = await runner.step(row)
    await runner.drain(5.0)
    return worked


async def test_counts_follow_every_job_and_recipient_change(pool: asyncpg.Pool) -> None:
    account, broadcast_id, runner, sent = await a_broadcast(pool, 6, 10)
    assert await counts(pool, broadcast_id) == {
        "pending": 10, "sending": 0, "sent": 0, "delivered": 0, "failed": 0, "held": 0,
        "canceled": 0, "credits_reserved": 0, "credits_spent": 0}
    while await step(pool, runner, broadcast_id):
        await counts(pool, broadcast_id)
    assert await step(pool, runner, broadcast_id) is False
    found = await counts(pool, broadcast_id)
    assert (found["pending"], found["sending"], found["held"]) == (0, 6, 4)
    assert found["credits_reserved"] == 6

    jobs = JobStore(pool)
    a, b, c, d, e, f = sent
    await jobs.accepted(a, "SMa")
    await jobs.provider_status(b, "SMb", "sent")
    await jobs.accepted_many([(b, "SMb"), (c, "SMc")])
    await counts(pool, broadcast_id)
    await jobs.provider_status(a, "SMa", "delivered", cost=1, settle=True)
    await jobs.provider_status(b, "SMb", "undelivered", cost=1, settle=True)
    await jobs.provider_status(c, "SMc", "failed", settle=True)
    await jobs.unknown(d, "timeout")
    await jobs.retry_later(e, "rate_limited", 20429)
    await jobs.not_sent(f, "invalid_number", 21211)
    assert await counts(pool, broadcast_id) == {
        "pending": 0, "sending": 2, "sent": 0, "delivered": 1, "failed": 3, "held": 4,
        "canceled": 0, "credits_reserved": 2, "credits_spent": 2}

    await CreditStore(pool).grant(account, 2, "purchase", uid("pay"))
    released = await pool.fetch(q("release_held"), account, 2)
    assert len([r for r in released if r["outcome"] == "released"]) == 2
    assert (await counts(pool, broadcast_id))["held"] == 2
    assert await pool.fetchval(q("broadcast_cancel"), broadcast_id) == "canceled"
    found = await counts(pool, broadcast_id)
    # Canceled: the 2 still held, the 2 released and the one waiting to retry (none of them
    # claimed for a provider call); the `unknown` one may have been sent and stays.
    assert (found["held"], found["canceled"], found["sending"]) == (0, 5, 1)


async def test_canceling_unsent_recipients_counts_them_canceled(pool: asyncpg.Pool) -> None:
    _, broadcast_id, runner, sent = await a_broadcast(pool, 100, 9)
    assert await step(pool, runner, broadcast_id)
    # Two of the four reserved are claimed for their provider call (in flight): they stay.
    jobs = JobStore(pool)
    assert [(await jobs.claim_for_send(job_id, 1)).claimed for job_id in sent[:2]] == [True] * 2
    assert await pool.fetchval(q("broadcast_cancel"), broadcast_id) == "canceled"
    assert await counts(pool, broadcast_id) == {
        "pending": 0, "sending": 2, "sent": 0, "delivered": 0, "failed": 0, "held": 0,
        "canceled": 7, "credits_reserved": 2, "credits_spent": 0}
    claims = [await jobs.claim_for_send(job_id, 1) for job_id in sent[2:]]
    assert claims == [Claim(False, "canceled", broadcast_id)] * 2


async def test_a_claimed_recipient_resent_after_the_cancel_is_canceled_at_its_claim(
        pool: asyncpg.Pool) -> None:
    # Claimed, then its process died: the cancel leaves it (its create may have gone out).
    # The reconciler finds nothing at the provider and resends it: its claim now cancels it.
    account, broadcast_id, runner, sent = await a_broadcast(pool, 100, 3)
    assert await step(pool, runner, broadcast_id)
    jobs = JobStore(pool)
    first = sent[0]
    assert (await jobs.claim_for_send(first, 1)).claimed
    assert await pool.fetchval(q("broadcast_cancel"), broadcast_id) == "canceled"
    assert (await jobs.get(first) or {})["status"] == "sending"
    assert await pool.fetchval("UPDATE jobs SET attempts = attempts + 1 WHERE job_id = $1 "
                               "RETURNING attempts", first) == 2  # the reconciler's claim
    assert await jobs.claim_for_send(first, 2) == Claim(False, "canceled", broadcast_id)
    job = await jobs.get(first)
    assert job is not None and (job["status"], job["final_cost"]) == ("canceled", 0)
    assert (await counts(pool, broadcast_id))["credits_reserved"] == 0
    assert await run_audit(pool) == []
    assert await pool.fetchval(
        "SELECT reserved FROM accounts WHERE id = $1", account) == 0
