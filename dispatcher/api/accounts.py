"""Account routes: balance, ledger, auto-recharge settings, credit grants and refunds."""

from __future__ import annotations

import re
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from dispatcher.api.auth import principal
from dispatcher.api.errors import IdempotencyConflict, NotFound, UnknownPurchase
from dispatcher.api.idempotency import Outcome, fingerprint, run_once
from dispatcher.api.parsing import (
    bad_cursor,
    decode_cursor,
    encode_cursor,
    idempotency_key,
    query,
    read_json,
)
from dispatcher.api.schemas import (
    AutoRecharge,
    AutoRechargeUpdate,
    BalanceOut,
    Buckets,
    CreditsIn,
    CreditsOut,
    LedgerEntry,
    LedgerPage,
    MessagingSettings,
    MessagingSettingsUpdate,
    PageQuery,
    RefundIn,
    RefundOut,
    SpendGuards,
    SpendGuardsUpdate,
    VelocityReleased,
)
from dispatcher.credits.guards import GuardSettings, load_guards, release_velocity, set_guards
from dispatcher.credits.ledger import CreditStore, Executor
from dispatcher.db import Connection
from dispatcher.errors import InvalidGrant
from dispatcher.queries import q

log = structlog.get_logger(__name__)

_LEDGER_POSITION = re.compile(r"[0-9]{1,19}")
_MAX_BIGINT = 2**63 - 1


def api_reference(account: str, key: str) -> str:
    """The ledger reference of a grant or refund made through the API with this key."""
    # '/' never occurs in an account id, so (account, key) -> reference is one-to-one.
    return f"api:{account}/{key}"


def _auto_recharge(row: Any) -> AutoRecharge:
    return AutoRecharge(enabled=row["auto_recharge_enabled"],
                        threshold=row["auto_recharge_threshold"],
                        amount=row["auto_recharge_amount"], topup_at_zero=row["topup_at_zero"])


async def load_balance(db: Executor, account: str) -> BalanceOut:
    """The account's balance view; 404 when there is no such account."""
    row = await db.fetchrow(q("api_account_balance"), account)
    if row is None:
        raise NotFound(f"no account {account!r}")
    return BalanceOut(
        account=account, total=row["available"] + row["reserved"], reserved=row["reserved"],
        available=row["available"],
        buckets=Buckets(subscription=row["sub_available"],
                        purchased=row["purchased_available"], debt=row["debt"]),
        paused=row["paused_at"] is not None, paused_since=row["paused_at"],
        auto_recharge=_auto_recharge(row),
        spend_guards=SpendGuards(**(await load_guards(db, account)).as_json()))


def _ledger_entry(row: Any) -> LedgerEntry:
    return LedgerEntry(
        id=row["id"], kind=row["kind"], reference=row["reference"], amount=row["amount"],
        subscription_delta=row["sub_delta"], purchased_delta=row["purchased_delta"],
        debt_delta=row["debt_delta"], reserved_delta=row["reserved_delta"],
        forfeited=row["forfeited"], job_id=row["job_id"], created_at=row["created_at"])


def _ledger_after(cursor: str) -> int:
    if not cursor:
        return 0
    position = decode_cursor(cursor, _LEDGER_POSITION)
    if position is None or int(position) > _MAX_BIGINT:
        raise bad_cursor()
    return int(position)


class AccountsApi:
    """Handlers of ``/v1/accounts/{account}/…`` for balances and billing."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def get_balance(self, request: web.Request) -> web.Response:
        balance = await load_balance(self._pool, request.match_info["account"])
        return web.json_response(balance.model_dump(mode="json"))

    async def get_ledger(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        page = query(request, PageQuery)
        rows = await self._pool.fetch(q("ledger_page"), account, _ledger_after(page.cursor),
                                      page.limit + 1)
        more = len(rows) > page.limit
        entries = [_ledger_entry(row) for row in rows[:page.limit]]
        next_cursor = encode_cursor(str(entries[-1].id)) if more else None
        return web.json_response(
            LedgerPage(entries=entries, next_cursor=next_cursor).model_dump(mode="json"))

    async def get_auto_recharge(self, request: web.Request) -> web.Response:
        balance = await load_balance(self._pool, request.match_info["account"])
        return web.json_response(balance.auto_recharge.model_dump(mode="json"))

    async def put_auto_recharge(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        body = await read_json(request, AutoRechargeUpdate)
        row = await self._pool.fetchrow(q("api_set_auto_recharge"), account, body.enabled,
                                        body.threshold, body.amount, body.topup_at_zero)
        if row is None:
            raise NotFound(f"no account {account!r}")
        log.info("auto_recharge_changed", account_id=account, enabled=body.enabled,
                 token_id=principal(request).token_id)
        return web.json_response(_auto_recharge(row).model_dump(mode="json"))

    async def get_messaging_settings(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        row = await self._pool.fetchrow(q("api_messaging_settings"), account)
        if row is None:
            raise NotFound(f"no account {account!r}")
        return web.json_response(MessagingSettings(**dict(row)).model_dump(mode="json"))

    async def put_messaging_settings(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        body = await read_json(request, MessagingSettingsUpdate)
        row = await self._pool.fetchrow(q("api_set_messaging_settings"), account,
                                        body.smart_encoding)
        if row is None:
            raise NotFound(f"no account {account!r}")
        log.info("messaging_settings_changed", account_id=account,
                 smart_encoding=body.smart_encoding, token_id=principal(request).token_id)
        return web.json_response(MessagingSettings(**dict(row)).model_dump(mode="json"))

    async def get_spend_guards(self, request: web.Request) -> web.Response:
        balance = await load_balance(self._pool, request.match_info["account"])
        return web.json_response(balance.spend_guards.model_dump(mode="json"))

    async def put_spend_guards(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        body = await read_json(request, SpendGuardsUpdate)
        countries = body.allowed_countries
        settings = GuardSettings(
            body.daily_spend_cap, None if countries is None else tuple(countries),
            body.max_credits_per_message, body.velocity_window_seconds, body.velocity_multiple,
            body.velocity_min_credits, body.transactional_reserve, body.transactional_overdraft)
        if not await set_guards(self._pool, account, settings):
            raise NotFound(f"no account {account!r}")
        log.info("spend_guards_changed", account_id=account,
                 daily_spend_cap=body.daily_spend_cap, token_id=principal(request).token_id)
        return await self.get_spend_guards(request)

    async def post_release_velocity(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        released = await release_velocity(self._pool, account)
        log.info("velocity_hold_released", account_id=account, released=released,
                 token_id=principal(request).token_id)
        return web.json_response(VelocityReleased(released=released).model_dump(mode="json"))

    async def post_credits(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        key = idempotency_key(request)
        body = await read_json(request, CreditsIn)
        caller = principal(request)

        async def grant(conn: Connection) -> Outcome:
            reference = api_reference(account, key)
            try:
                await CreditStore(conn).grant(account, body.amount, body.kind, reference)
            except InvalidGrant as exc:
                raise IdempotencyConflict(str(exc)) from exc
            log.info("credits_granted_api", account_id=account, amount=body.amount,
                     kind=body.kind, token_id=caller.token_id)
            out = CreditsOut(account=account, reference=reference, amount=body.amount,
                             kind=body.kind, note=body.note,
                             balance=await load_balance(conn, account))
            return 201, out.model_dump(mode="json")

        return await run_once(self._pool, account, key, caller.token_id,
                              fingerprint("credits", body), grant)

    async def post_refund(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        key = idempotency_key(request)
        body = await read_json(request, RefundIn)
        caller = principal(request)

        async def refund(conn: Connection) -> Outcome:
            reference = api_reference(account, key)
            try:
                await CreditStore(conn).refund(account, body.purchase_reference, body.amount,
                                               reference)
            except InvalidGrant as exc:
                raise UnknownPurchase() from exc
            log.info("credits_refunded_api", account_id=account, amount=body.amount,
                     token_id=caller.token_id)
            out = RefundOut(account=account, reference=reference,
                            purchase_reference=body.purchase_reference, amount=body.amount,
                            balance=await load_balance(conn, account))
            return 201, out.model_dump(mode="json")

        return await run_once(self._pool, account, key, caller.token_id,
                              fingerprint("refund", body), refund)
