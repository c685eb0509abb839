"""The service's PostgreSQL state in schema ``billing_ref``: every statement is a named query.

Decisions run in one transaction with the account's row locked; the unique partial index on
in-flight top-ups backs the lock up. Replies go to an outbox in the transaction that decides
them, so a crash can delay a reply but never lose it. Times that rules depend on (when a
top-up is due, when an invoice was made) come from the injectable clock, not from ``now()``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from billing_client.events import (
    BillingEvent,
    CreditsGranted,
    DeclinedCharge,
    TopupCapped,
    TopupCapWarning,
    TopupDisabled,
    TopupFailed,
    decode_event,
    encode_event,
)
from billing_client.reference.clock import (
    HOUR,
    Clock,
    month_of,
    month_start,
    next_month_start,
    utc_now,
)
from billing_client.reference.decision import (
    CAPPED,
    CHARGE,
    HOURLY,
    AccountState,
    Gate,
    Limits,
    TriggerEvent,
    Verdict,
    cap_levels,
    gate_charge,
)
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
# Refusals by the card's bank: they count toward pausing auto-recharge.
DECLINES = ("declined", "insufficient_funds")
PAUSE_ADVICE = ("Auto-recharge is off after consecutive declined charges: update the payment "
                "method, then turn auto-recharge back on (an owner action).")


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

    def __init__(self, pool: asyncpg.Pool, clock: Clock | None = None,
                 defaults: tuple[int, int] = (3, 3)) -> None:
        self._pool = pool
        self.clock: Clock = clock or utc_now
        # The service's default hourly charge limit and decline limit.
        self._defaults = defaults

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
            await conn.execute(q("record_last_trigger"), event.account,
                                encode_event(event).decode())
            verdict, topup_id = await self._decide(conn, event, decide)
            await conn.execute(q("set_event_decision"), event.event_id, verdict.decision,
                               topup_id)
        return verdict, topup_id

    async def _decide(self, conn: PoolConnectionProxy[asyncpg.Record], event: TriggerEvent,
                      decide: Callable[[TriggerEvent, AccountState], Verdict],
                      ) -> tuple[Verdict, int | None]:
        """Under the account lock: decide, and insert the top-up when one starts."""
        row = await conn.fetchrow(q("account_state"), event.account, event.episode,
                                  month_of(self.clock()))
        assert row is not None  # the caller created the account row
        verdict = decide(event, AccountState(**dict(row)))
        topup_id: int | None = None
        if verdict.starts_topup and verdict.resume:
            # The owner turned auto-recharge on again in the dispatcher since the pause.
            await conn.execute(q("enable_recharge"), event.account)
        if verdict.starts_topup:
            topup_id = await conn.fetchval(q("insert_topup"), event.account, event.episode,
                                           event.type, event.event_id, verdict.amount,
                                           self.clock())
            if topup_id is None:  # the index caught what the lock should have
                verdict = Verdict("topup_in_flight")
        return verdict, topup_id

    async def charge_now_if_low(self, account: str,
                                decide: Callable[[TriggerEvent, AccountState], Verdict],
                                ) -> tuple[Verdict, int | None]:
        """After an owner action: decide again on the last balance event, so an account still
        below its threshold is charged once, at once (same rules as a new event)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(q("lock_account"), account)
            raw = await conn.fetchval(q("last_trigger"), account)
            if raw is None:
                return Verdict("no_balance_event"), None
            event = decode_event(str(raw).encode())
            assert isinstance(event, TriggerEvent)
            return await self._decide(conn, event, decide)

    async def claim_due(self, lease_seconds: float) -> Topup | None:
        """Lease the oldest due in-flight top-up, if any."""
        row = await self._pool.fetchrow(q("claim_due_topup"), lease_seconds, self.clock())
        return None if row is None else Topup(**dict(row))

    async def seconds_until_due(self) -> float | None:
        """Seconds until the next in-flight top-up is due (negative: overdue; None: none)."""
        value: float | None = await self._pool.fetchval(q("seconds_until_due"), self.clock())
        return value

    async def gate(self, topup: Topup) -> Gate:
        """Before a new charge, under the account lock: charge, wait (hourly limit: the top-up
        is rescheduled), or stop (paused, capped: the top-up ends and the owner is told)."""
        now = self.clock()
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(q("lock_account_row"), topup.account)
            if await conn.fetchval(q("topup_unsettled"), topup.id):
                return Gate(CHARGE)  # the same request again, with its key: not a new charge
            limits = await self._limits(conn, topup.account, now)
            verdict = gate_charge(limits, topup.amount, now)
            if verdict.decision == HOURLY:
                await conn.execute(q("topup_defer"), topup.id, topup.attempts, verdict.retry_at,
                                   HOURLY)
            elif verdict.decision == CAPPED and not limits.capped:
                await self._capped(conn, topup, limits, now, refused=topup.amount)
        return verdict

    async def _limits(self, conn: PoolConnectionProxy[asyncpg.Record], account: str,
                      now: datetime) -> Limits:
        row = await conn.fetchrow(q("account_limits"), account, now - HOUR, month_start(now),
                                  month_of(now), *self._defaults)
        assert row is not None
        return Limits(**dict(row))

    async def _capped(self, conn: PoolConnectionProxy[asyncpg.Record], topup: Topup,
                      limits: Limits, now: datetime, *, refused: int | None) -> None:
        """Mark the cap reached for this month and cap, and tell the owner once."""
        assert limits.monthly_cap is not None
        month = month_of(now)
        await conn.execute(q("set_capped"), topup.account, month, limits.monthly_cap)
        event = TopupCapped(account=topup.account, month=month, unit=limits.cap_unit,
                            cap=limits.monthly_cap, used=limits.month_used,
                            refused_amount=refused, resets_at=next_month_start(now),
                            episode=topup.episode, occurred_at=now)
        if await conn.fetchval(q("cap_notice"), topup.account, month, 100, limits.monthly_cap,
                               event.event_id):
            await _outbox(conn, event)

    async def record_outcome(self, topup: Topup, role: str,
                             result: ChargeResult) -> tuple[int, int, list[DeclinedCharge]]:
        """Count a decline toward the pause (a success resets the count): (declines in a row,
        the limit, the declines)."""
        if result.succeeded:
            await self._pool.execute(q("reset_declines"), topup.account)
            return 0, 0, []
        if result.status not in DECLINES:
            return 0, 0, []
        decline = DeclinedCharge(reason=result.status, payment_method=role, at=self.clock())
        row = await self._pool.fetchrow(q("record_decline"), topup.account,
                                        json.dumps([decline.model_dump(mode="json")]),
                                        self._defaults[1])
        if row is None:
            return 0, 0, []
        run = [DeclinedCharge.model_validate_json(json.dumps(item))
               for item in json.loads(row["decline_run"])]
        return int(row["consecutive_declines"]), int(row["decline_limit"]), run

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
            now = self.clock()
            await conn.execute(q("lock_account_row"), topup.account)
            limits = await self._limits(conn, topup.account, now)
            await conn.execute(q("insert_invoice"), topup.id, topup.account, topup.amount,
                               grant.amount, grant.payment_reference, charge_id, role, now,
                               limits.hourly_limit, limits.monthly_cap, limits.cap_unit)
            await _outbox(conn, grant)
            await self._cap_notices(conn, topup, now)
        return True

    async def _cap_notices(self, conn: PoolConnectionProxy[asyncpg.Record], topup: Topup,
                           now: datetime) -> None:
        """After a charge: warn at 80 % and 90 % of the monthly cap, cap at 100 % (each once)."""
        limits = await self._limits(conn, topup.account, now)
        cap, month = limits.monthly_cap, month_of(now)
        for level in cap_levels(limits.month_used, cap):
            assert cap is not None
            if level == 100:
                await self._capped(conn, topup, limits, now, refused=None)
                continue
            warning = TopupCapWarning(account=topup.account, percent=level, month=month,
                                      unit=limits.cap_unit, cap=cap, used=limits.month_used,
                                      occurred_at=now)
            if await conn.fetchval(q("cap_notice"), topup.account, month, level, cap,
                                   warning.event_id):
                await _outbox(conn, warning)

    async def finish_failure(self, topup: Topup, failed: TopupFailed, *, gave_up: bool,
                             disabled: TopupDisabled | None = None) -> bool:
        """Count the failed attempt, schedule the retry or give up, queue ``topup.failed``;
        with ``disabled``, also turn auto-recharge off for the account and say why."""
        status = "failed" if gave_up or disabled is not None else "in_flight"
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(q("topup_attempt_failed"), topup.id, topup.attempts,
                                       status, failed.reason, failed.payment_method,
                                       failed.next_attempt_at)
            if done is None:
                return False
            await _outbox(conn, failed)
            if disabled is not None:
                paused = await conn.fetchrow(q("pause_recharge"), topup.account,
                                             disabled.occurred_at)
                if paused is not None:
                    await _outbox(conn, disabled.model_copy(
                        update={"settings_changed_at": paused["paused_settings_at"]}))
        return True

    async def set_limits(self, account: str, *, hourly_limit: int | None = None,
                         decline_limit: int | None = None, monthly_cap: int | None = None,
                         cap_unit: str | None = None, clear_cap: bool = False) -> None:
        """An owner's recharge limits (None keeps a value); a new cap lifts a reached one."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(q("lock_account"), account)
            await conn.execute(q("set_limits"), account, hourly_limit, decline_limit,
                               monthly_cap, cap_unit, clear_cap)

    async def enable(self, account: str) -> None:
        """An owner turns auto-recharge back on: the pause and the decline count are cleared."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(q("lock_account"), account)
            await conn.execute(q("enable_recharge"), account)

    async def status(self, account: str) -> dict[str, Any] | None:
        """The account's recharge limits and safety state."""
        row = await self._pool.fetchrow(q("recharge_status"), account, *self._defaults)
        if row is None:
            return None
        shown = dict(row)
        shown["decline_run"] = json.loads(shown["decline_run"])
        return shown

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


async def _outbox(conn: PoolConnectionProxy[asyncpg.Record], event: BillingEvent) -> None:
    """Queue a reply for the relay, in the caller's transaction."""
    await conn.execute(q("outbox_insert"), event.event_id, event.routing_key,
                       encode_event(event).decode())

