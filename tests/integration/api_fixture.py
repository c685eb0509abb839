"""The HTTP API against the real PostgreSQL: an app on a TestServer, two tenants, every role."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, unused_port

from dispatcher.api import add_api_routes
from dispatcher.credits.subscriptions import Plan, create_account
from dispatcher.tokens import ROLES, create_token

TWILIO_AUTH_TOKEN = "test-twilio-auth-token"
MAX_APP_BODY = 1024 * 1024


@dataclass(frozen=True)
class Tenant:
    """An account and one token per role."""

    account: str
    tokens: dict[str, str]


@dataclass(frozen=True)
class Api:
    """A running API, two tenants (A and B) and operator tokens by role."""

    client: TestClient[web.Request, web.Application]
    base_url: str
    a: Tenant
    b: Tenant
    operator: dict[str, str]

    def token(self, who: str) -> str:
        """'owner'…'service' of tenant A, or 'operator_<role>'."""
        if who.startswith("operator_"):
            return self.operator[who.removeprefix("operator_")]
        return self.a.tokens[who]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_account_id(prefix: str = "acct") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def make_tenant(pool: asyncpg.Pool, subscription: int = 0) -> Tenant:
    account = new_account_id()
    await create_account(pool, account, plan=Plan(allocation=subscription))
    tokens = {role: await create_token(pool, account, role, name=f"test {role}")
              for role in ROLES}
    return Tenant(account, tokens)


def build_app(pool: asyncpg.Pool, base_url: str) -> web.Application:
    app = web.Application(client_max_size=MAX_APP_BODY)
    add_api_routes(app, pool, twilio_auth_token=TWILIO_AUTH_TOKEN, public_base_url=base_url)
    return app


@pytest.fixture(name="api")
async def api_server(pool: asyncpg.Pool) -> AsyncIterator[Api]:
    """A running API (fixture ``api``) with two tenants and every role."""
    port = unused_port()
    base_url = f"http://127.0.0.1:{port}"
    client = TestClient(TestServer(build_app(pool, base_url), host="127.0.0.1", port=port))
    await client.start_server()
    operator = {role: await create_token(pool, None, role, operator=True) for role in ROLES}
    try:
        yield Api(client, base_url, await make_tenant(pool, 50), await make_tenant(pool, 50),
                  operator)
    finally:
        await client.close()
