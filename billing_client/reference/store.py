"""The service's PostgreSQL state in schema ``billing_ref``: every statement is a named query.

Decisions run in one transaction with the account's row locked; the unique partial index on
in-flight top-ups backs the lock up. Replies go to an outbox in the transaction that decides
them, so a crash can delay a reply but never lose it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from billing_client.events import CreditsGranted, TopupFailed, encode_event
from billing_client.reference.decision import AccountState, TriggerEvent, Verdict
from billing_client.reference.errors import InvalidPaymentMethod
from billing_client.reference.gateway import ChargeResult
from billing_client.reference.queries import q, schema

# What a database outage looks like to us: wait and retry, never crash a loop.
DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
DUPLICATE = "duplicate"
ROLES = ("primary", "backup")
PURPOSES = ("auto_recharge", "subscription")
# A charge whose outcome we do not know yet: the next request must reuse its key.
UNSETTLED = ("pending", "timeout")


@dataclass(frozen=True)
class Topup:
    """An in-flight top-up claimed for one charging attempt."""

    id: int
    account: str
    episode: int
    amount: int
    attempts: int  # failed attempts so far
    trigger_event_id: UUID


class BillingStore:
    """Named-query access to ``billing_ref`` through one pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def ensure_schema(self) -> None:
        """Create the schema and tables if missing (serialized across processes)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(q("lock_schema"))
            await conn.execute(schema())

    async def apply_trigger(self, event: TriggerEvent,
                            decide: Callable[[TriggerEvent, AccountState], Verdict],
                            ) -> tuple[Verdict, int | None]:
        """Record the event once and, under the account lock, decide and maybe start a top-up."""
        async with self._pool.acquire() as conn, conn.transaction():
            new = await conn.fetchval(q("record_event"), event.event_id, event.type,
                                      event.account, event.episode)
            if new is None:
                return Verdict(DUPLICATE), None
            await conn.execute(q("lock_account"), event.account)
            row = await conn.fetchrow(q("account_state"), event.account, event.episode)
            assert row is not None  # the query always returns one row
            verdict = decide(event, AccountState(**dict(row)))
            topup_id: int | None = None
            if verdict.starts_topup:
                topup_id = await conn.fetchval(q("insert_topup"), event.account, event.episode,
                                               event.type, event.event_id, verdict.amount)
                if topup_id is None:  # the index caught what the lock should have
                    verdict = Verdict("topup_in_flight")
            await conn.execute(q("set_event_decision"), event.event_id, verdict.decision,
                               topup_id)
        return verdict, topup_id

    async def claim_due(self, lease_seconds: float) -> Topup | None:
        """Lease the oldest due in-flight top-up, if any."""
        row = await self._pool.fetchrow(q("claim_due_topup"), lease_seconds)
        return None if row is None else Topup(**dict(row))

    async def seconds_until_due(self) -> float | None:
        """Seconds until the next in-flight top-up is due (negative: overdue; None: none)."""
        value: float | None = await self._pool.fetchval(q("seconds_until_due"))
        return value

    async def methods(self, account: str, purpose: str = "auto_recharge") -> dict[str, str]:
        """The account's registered tokens by role."""
        rows = await self._pool.fetch(q("methods_for"), account, purpose)
        return {row["role"]: row["token"] for row in rows}

    async def begin_charge(self, topup: Topup, role: str) -> tuple[int, str]:
        """Record a pending request; reuse the key of an earlier unsettled one."""
        async with self._pool.acquire() as conn, conn.transaction():
            last = await conn.fetchrow(q("last_charge"), topup.id, role)
            attempt = topup.attempts + 1
            if last is not None and last["status"] in UNSETTLED:
                key = str(last["idempotency_key"])
            else:
                key = f"topup-{topup.id}-{role}-{attempt}"
            row_id: int = await conn.fetchval(q("insert_charge"), topup.id, attempt, role, key)
        return row_id, key

    async def settle_charge(self, charge_row: int, result: ChargeResult) -> None:
        """Record the gateway's answer to one request."""
        await self._pool.execute(q("settle_charge"), charge_row, result.status, result.charge_id)

    async def finish_success(self, topup: Topup, role: str, charge_id: str,
                             grant: CreditsGranted) -> bool:
        """Mark succeeded, write the invoice and queue the grant; False if no longer ours."""
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(q("topup_succeeded"), topup.id, topup.attempts, role,
                                       grant.payment_reference, grant.event_id)
            if done is None:
                return False
            await conn.execute(q("insert_invoice"), topup.id, topup.account, topup.amount,
                               grant.amount, grant.payment_reference, charge_id, role)
            await _outbox(conn, grant)
        return True

    async def finish_failure(self, topup: Topup, failed: TopupFailed, *, gave_up: bool) -> bool:
        """Count the failed attempt, schedule the retry or give up, queue ``topup.failed``."""
        status = "failed" if gave_up else "in_flight"
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(q("topup_attempt_failed"), topup.id, topup.attempts,
                                       status, failed.reason, failed.payment_method,
                                       failed.next_attempt_at)
            if done is None:
                return False
            await _outbox(conn, failed)
        return True

    async def set_method(self, account: str, role: str, token: str | None,
                         purpose: str = "auto_recharge") -> None:
        """Register (or, with ``token=None``, remove) the account's method for a role."""
        if role not in ROLES or purpose not in PURPOSES or token == "":
            raise InvalidPaymentMethod()
        if token is None:
            await self._pool.execute(q("delete_method"), account, purpose, role)
        else:
            await self._pool.execute(q("set_method"), account, purpose, role, token)

    async def invoices(self, account: str) -> list[dict[str, Any]]:
        """The account's invoices, oldest first."""
        return [dict(row) for row in await self._pool.fetch(q("invoices_for"), account)]


async def _outbox(conn: PoolConnectionProxy[asyncpg.Record],
                  event: CreditsGranted | TopupFailed) -> None:
    """Queue a reply for the relay, in the caller's transaction."""
    await conn.execute(q("outbox_insert"), event.event_id, event.routing_key,
                       encode_event(event).decode())

