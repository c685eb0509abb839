"""``dispatcher audit`` against an attacker: edits that keep the old sums balanced still show.

The old checks only summed the ``*_delta`` columns, so editing a capture's ``amount`` or a job's
``final_cost`` passed, and ``TRUNCATE`` went around the row-level append-only trigger.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from billing_client.reference.store import BillingStore
from dispatcher.credits.audit import Violation, cross_check_billing, run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from tests.integration.test_ledger_cli import cli

ACCOUNT = "tamper"


@pytest.fixture
async def ledger(fresh_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """An account with a purchase, a subscription period, captures below and above the
    estimate, a release, a refund: every kind of ledger row, and a clean audit."""
    pool = await asyncpg.create_pool(fresh_database_url, min_size=1, max_size=4)
    assert pool is not None
    store = CreditStore(pool)
    await create_account(pool, ACCOUNT)
    await store.grant(ACCOUNT, 100, "purchase", "pay-1")
    now = datetime.now(UTC)
    await store.start_period(ACCOUNT, 20, "period-1", now, now + timedelta(days=30))
    for job_id, estimate, actual in (("j-below", 10, 7), ("j-above", 10, 15), ("j-free", 5, 0)):
        await store.reserve(job_id, ACCOUNT, estimate)
        await store.capture(job_id, actual)
        await insert_job(pool, job_id, estimate, actual)
    await store.reserve("j-released", ACCOUNT, 4)
    await store.release("j-released")
    await store.refund(ACCOUNT, "pay-1", 3, "refund-1")
    assert await run_audit(pool) == []
    yield pool
    await pool.close()


async def insert_job(pool: asyncpg.Pool, job_id: str, estimate: int, final_cost: int) -> None:
    await pool.execute(
        "INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate, "
        "final_cost) VALUES ($1, $2, 'sms', 'transactional', 'delivered', '{}', $3, $4)",
        job_id, ACCOUNT, estimate, final_cost)


async def tamper(pool: asyncpg.Pool, sql: str, *args: object) -> None:
    """What an attacker with the table owner's rights does: around the append-only trigger."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE ledger DISABLE TRIGGER ledger_append_only")
        await conn.execute(sql, *args)
        await conn.execute("ALTER TABLE ledger ENABLE TRIGGER ledger_append_only")


def checks(violations: list[Violation]) -> set[str]:
    return {v.check for v in violations}


async def test_an_edited_capture_amount_is_found(ledger: asyncpg.Pool) -> None:
    await tamper(ledger, "UPDATE ledger SET amount = amount - 5 WHERE reference = $1",
                 "settle:j-above")
    found = checks(await run_audit(ledger))
    assert {"audit_ledger_amounts", "audit_ledger_vs_reservations",
            "audit_final_cost_vs_captures"} <= found


async def test_an_edited_reserve_amount_is_found(ledger: asyncpg.Pool) -> None:
    await tamper(ledger, "UPDATE ledger SET amount = 1 WHERE reference = $1", "reserve:j-below")
    assert "audit_ledger_amounts" in checks(await run_audit(ledger))


async def test_a_final_cost_that_disagrees_with_the_capture_is_found(
        ledger: asyncpg.Pool) -> None:
    await ledger.execute("UPDATE jobs SET final_cost = 3 WHERE job_id = 'j-below'")
    await insert_job(ledger, "j-never-reserved", 5, 5)
    violations = [v for v in await run_audit(ledger)
                  if v.check == "audit_final_cost_vs_captures"]
    assert sorted(v.problem for v in violations) == [
        "job j-below has final_cost 3 but its settlement (capture) moved 7",
        "job j-never-reserved has final_cost 5 but its settlement is missing"]


async def test_truncate_of_the_ledger_is_refused(ledger: asyncpg.Pool) -> None:
    rows = await ledger.fetchval("SELECT count(*) FROM ledger")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await ledger.execute("TRUNCATE ledger")
    assert await ledger.fetchval("SELECT count(*) FROM ledger") == rows


async def test_a_disabled_guard_is_reported(ledger: asyncpg.Pool) -> None:
    await ledger.execute("ALTER TABLE ledger DISABLE TRIGGER ledger_no_truncate")
    violations = await run_audit(ledger)
    assert [(v.check, v.problem) for v in violations] == [
        ("audit_ledger_guards", "ledger trigger ledger_no_truncate is disabled")]


async def add_invoice(pool: asyncpg.Pool, account: str, credits: int, reference: str,
                      age: timedelta = timedelta(0)) -> None:
    topup = await pool.fetchval(
        "INSERT INTO billing_ref.topups (account, episode, trigger_type, trigger_event_id, "
        "status, amount, payment_reference) VALUES ($1, 1, 'balance.low', $2, 'succeeded', $3, "
        "$4) RETURNING id", account, uuid.uuid4(), credits, reference)
    await pool.execute(
        "INSERT INTO billing_ref.invoices (topup_id, account, amount, credits, payment_reference, "
        "charge_id, method, created_at) VALUES ($1, $2, $3, $3, $4, 'ch-1', 'primary', "
        "now() - $5::interval)", topup, account, credits, reference, age)


async def test_grants_are_matched_to_the_billing_services_invoices(
        ledger: asyncpg.Pool, fresh_database_url: str) -> None:
    # The reference billing service keeps its store in its own schema (here: same database).
    await BillingStore(ledger).ensure_schema()
    await add_invoice(ledger, ACCOUNT, 100, "pay-1")
    assert await cross_check_billing(ledger, ledger) == []

    await CreditStore(ledger).grant(ACCOUNT, 50, "auto_recharge", "pay-forged")
    await CreditStore(ledger).grant(ACCOUNT, 9, "adjustment", "goodwill-1")  # not a payment
    await add_invoice(ledger, ACCOUNT, 40, "pay-lost", age=timedelta(hours=1))
    await add_invoice(ledger, ACCOUNT, 40, "pay-in-flight")  # its grant may still be coming
    problems = [v.problem for v in await cross_check_billing(ledger, ledger)]
    assert problems == [
        "grant 'pay-forged' (grant_auto_recharge, 50 credits) has no billing invoice",
        "invoice 'pay-lost' (40 credits) was paid but never granted"]

    code, out = await cli(fresh_database_url, "audit", "--billing-dsn", fresh_database_url)
    assert code == 1 and "pay-forged" in out and "pay-lost" in out
    code, out = await cli(fresh_database_url, "audit")
    assert code == 0 and "audit OK" in out
