"""The account HTTP API (``/v1``), its OpenAPI document and the Twilio inbound webhook.

``add_api_routes`` adds the routes and two middlewares to an app: JSON errors with stable
codes, and bearer-token authentication with per-route roles.
"""

from __future__ import annotations

import asyncpg
from aiohttp import web

from dispatcher.api.accounts import AccountsApi
from dispatcher.api.auth import add_route, auth_middleware
from dispatcher.api.broadcasts import BroadcastsApi
from dispatcher.api.errors import Handler, error_middleware
from dispatcher.api.jobs import JobsApi
from dispatcher.api.openapi import OPERATIONS, serve_openapi
from dispatcher.api.optouts import InboundWebhook, OptOutsApi, is_opted_out, record_opt_out
from dispatcher.api.schedule import ScheduleApi
from dispatcher.broadcasts.runner import Broadcasts
from dispatcher.credits.rates import RateCache

__all__ = ["add_api_routes", "is_opted_out", "record_opt_out"]


def _handlers(pool: asyncpg.Pool, broadcasts: Broadcasts,
              hold_expiry_seconds: float) -> dict[str, Handler]:
    accounts, optouts, sends = AccountsApi(pool), OptOutsApi(pool), BroadcastsApi(broadcasts)
    jobs = JobsApi(pool, hold_expiry_seconds)
    schedule = ScheduleApi(pool, broadcasts)
    return {
        "getJob": jobs.get_job,
        "getBalance": accounts.get_balance,
        "listLedger": accounts.get_ledger,
        "getAutoRecharge": accounts.get_auto_recharge,
        "putAutoRecharge": accounts.put_auto_recharge,
        "getMessagingSettings": accounts.get_messaging_settings,
        "putMessagingSettings": accounts.put_messaging_settings,
        "getSpendGuards": accounts.get_spend_guards,
        "putSpendGuards": accounts.put_spend_guards,
        "releaseVelocityHold": accounts.post_release_velocity,
        "addCredits": accounts.post_credits,
        "refundCredits": accounts.post_refund,
        "listOptOuts": optouts.list_opt_outs,
        "putOptOut": optouts.put_opt_out,
        "deleteOptOut": optouts.delete_opt_out,
        "preflightBroadcast": sends.post_preflight,
        "submitBroadcast": sends.post_broadcast,
        "getBroadcast": sends.get_broadcast,
        "cancelBroadcast": sends.post_cancel,
        "cancelJob": schedule.post_cancel_job,
        "getQuietHours": schedule.get_quiet_hours,
        "putQuietHours": schedule.put_quiet_hours,
    }


def add_api_routes(app: web.Application, pool: asyncpg.Pool, *, twilio_auth_token: str,
                   public_base_url: str, broadcasts: Broadcasts | None = None,
                   hold_expiry_seconds: float = 72 * 3600.0) -> None:
    """Add ``/v1`` routes, ``/openapi.json`` and ``POST /twilio/inbound/{account}`` to ``app``.

    ``broadcasts`` is the service's (its runner sends what is submitted); without one,
    broadcasts are stored and priced but only a runner elsewhere sends them.
    """
    app.middlewares.append(error_middleware)
    app.middlewares.append(auth_middleware(pool))
    handlers = _handlers(pool, broadcasts or Broadcasts(pool, RateCache(pool)),
                         hold_expiry_seconds)
    for op in OPERATIONS:
        add_route(app, op.method, op.path, handlers[op.operation_id], op.permission)
    app.router.add_get("/openapi.json", serve_openapi)
    inbound = InboundWebhook(pool, twilio_auth_token, public_base_url)
    app.router.add_post("/twilio/inbound/{account}", inbound.handle)
