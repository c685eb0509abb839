"""Helpers of the spend-guard tests: funded accounts, jobs begun, events read from the outbox."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from dispatcher.credits.guards import GuardSettings, set_guards
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.jobs.store import Begin, JobStore, NewJob


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def guarded_account(pool: asyncpg.Pool, credits: int, settings: GuardSettings) -> str:
    """A new account with ``credits`` purchased and these guards."""
    account = uid("acct")
    await create_account(pool, account)
    if credits:
        await CreditStore(pool).grant(account, credits, "purchase", uid("pay"))
    assert await set_guards(pool, account, settings)
    return account


async def begin(pool: asyncpg.Pool, account: str, estimate: int = 1, *,
                priority: str = "bulk", country: str = "US",
                job_id: str | None = None) -> tuple[str, Begin]:
    job_id = job_id or uid("job")
    begun = await JobStore(pool).begin(NewJob(job_id, account, "sms", priority, {"id": job_id},
                                              estimate, country, 1, estimate))
    return job_id, begun


async def events(pool: asyncpg.Pool, account: str, prefix: str = "account.") -> list[
        dict[str, Any]]:
    """The outbox events of an account whose routing key starts with ``prefix``, in order."""
    rows = await pool.fetch(
        "SELECT routing_key, body::text AS body FROM outbox WHERE body ->> 'account' = $1"
        " AND routing_key LIKE $2 || '%' ORDER BY id", account, prefix)
    return [{"routing_key": r["routing_key"], **json.loads(r["body"])} for r in rows]


async def reserved_today(pool: asyncpg.Pool, account: str) -> int:
    """Credits the ledger says the account reserved today (UTC)."""
    return int(await pool.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = $1 AND kind = 'reserve'"
        " AND created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
        account))


async def job_row(pool: asyncpg.Pool, job_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow("SELECT status, reason FROM jobs WHERE job_id = $1", job_id)


async def start_next_utc_day(pool: asyncpg.Pool, account: str) -> None:
    """Make the account's guard state look as if it were written yesterday (UTC): the day's
    counter and a cap then belong to a day that has ended."""
    await pool.execute(
        "UPDATE account_guards SET spent_day = spent_day - 1,"
        " capped_until = capped_until - interval '1 day' WHERE account_id = $1", account)
