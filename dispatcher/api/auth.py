"""Bearer-token authentication and per-route roles for ``/v1``.

Each ``/v1`` route declares a ``Permission`` when it is added (``add_route``); the middleware
refuses a route that declared none. Checks run in this order: token (401), tenant (404: a token
of one account never learns whether another exists), role (403).
"""

from __future__ import annotations

import re
from enum import StrEnum

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Middleware

from dispatcher.api.errors import Forbidden, Handler, NotFound, Unauthenticated
from dispatcher.api.schemas import ACCOUNT_PATTERN
from dispatcher.queries import q
from dispatcher.tokens import Principal, authenticate


class Permission(StrEnum):
    """What a route does, which decides the roles allowed to call it."""

    READ = "read"
    BILLING = "billing"
    OPT_OUT_WRITE = "opt_out_write"
    BROADCAST = "broadcast"


ALLOWED_ROLES: dict[Permission, frozenset[str]] = {
    Permission.READ: frozenset({"owner", "admin", "member", "service"}),
    Permission.BILLING: frozenset({"owner", "admin"}),
    Permission.OPT_OUT_WRITE: frozenset({"owner", "admin", "service"}),
    # Sending and canceling spend credits: members only read (balances, pre-flights, progress).
    Permission.BROADCAST: frozenset({"owner", "admin", "service"}),
}

PREFIX = "/v1/"
PRINCIPAL = web.RequestKey("api_principal", Principal)
PERMISSIONS = web.AppKey("api_route_permissions", dict[web.AbstractRoute, Permission])
_ACCOUNT = re.compile(ACCOUNT_PATTERN)


def add_route(app: web.Application, method: str, path: str, handler: Handler,
              permission: Permission) -> web.AbstractRoute:
    """Add a ``/v1`` route with the permission its callers need."""
    route = app.router.add_route(method, path, handler)
    app.setdefault(PERMISSIONS, {})[route] = permission
    return route


def principal(request: web.Request) -> Principal:
    """The authenticated caller of a ``/v1`` request."""
    return request[PRINCIPAL]


def _bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated()
    return token.strip()


async def _check_tenant(pool: asyncpg.Pool, caller: Principal, account: str) -> None:
    if not _ACCOUNT.fullmatch(account) or not caller.may_see(account):
        raise NotFound(f"no account {account!r}")
    if caller.operator and not await pool.fetchval(q("api_account_exists"), account):
        raise NotFound(f"no account {account!r}")


def auth_middleware(pool: asyncpg.Pool) -> Middleware:
    """Authenticate ``/v1`` requests and enforce tenant and role before the handler runs."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(PREFIX):
            return await handler(request)
        caller = await authenticate(pool, _bearer(request))
        if caller is None:
            raise Unauthenticated()
        request[PRINCIPAL] = caller
        if request.match_info.http_exception is not None:
            return await handler(request)  # unknown path or method: aiohttp's 404 / 405
        permission = request.app.get(PERMISSIONS, {}).get(request.match_info.route)
        if permission is None:
            raise Forbidden("this route declares no permission")
        account = request.match_info.get("account")
        if account is not None:
            await _check_tenant(pool, caller, account)
        if caller.role not in ALLOWED_ROLES[permission]:
            raise Forbidden(f"role {caller.role!r} may not do this")
        return await handler(request)

    return middleware

