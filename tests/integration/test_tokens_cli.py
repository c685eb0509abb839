"""``dispatcher tokens create|revoke``: tokens an operator makes for the HTTP API."""

from __future__ import annotations

import hashlib

import asyncpg

from dispatcher.tokens import authenticate
from tests.integration.test_ledger_cli import cli


async def test_create_use_and_revoke_a_token(pool: asyncpg.Pool, database_url: str) -> None:
    assert (await cli(database_url, "accounts", "create", "tok-acct"))[0] == 0
    code, out = await cli(database_url, "tokens", "create", "--account", "tok-acct",
                          "--role", "admin", "--name", "billing ops")
    assert code == 0
    token = out.splitlines()[0]
    principal = await authenticate(pool, token)
    assert principal is not None
    assert (principal.account_id, principal.role, principal.operator) == ("tok-acct", "admin",
                                                                          False)
    stored = await pool.fetchval("SELECT count(*) FROM api_tokens WHERE name = 'billing ops'")
    assert stored == 1
    stored_hash = await pool.fetchval("SELECT secret_hash FROM api_tokens WHERE token_id = $1",
                                      principal.token_id)
    assert bytes(stored_hash) == hashlib.sha256(token.split("_", 2)[2].encode()).digest()

    assert await cli(database_url, "tokens", "revoke", principal.token_id) == (
        0, f"token {principal.token_id} revoked\n")
    assert await authenticate(pool, token) is None
    assert (await cli(database_url, "tokens", "revoke", principal.token_id))[0] == 1


async def test_operator_token_and_refusals(pool: asyncpg.Pool, database_url: str) -> None:
    code, out = await cli(database_url, "tokens", "create", "--operator", "--role", "admin")
    assert code == 0
    principal = await authenticate(pool, out.splitlines()[0])
    assert principal is not None
    assert principal.operator
    assert principal.account_id is None

    before = await pool.fetchval("SELECT count(*) FROM api_tokens")
    code, out = await cli(database_url, "tokens", "create", "--account", "nobody",
                          "--role", "member")
    assert code == 2
    assert "nobody" in out
    code, _ = await cli(database_url, "tokens", "create", "--account", "x", "--role", "god")
    assert code == 2
    code, _ = await cli(database_url, "tokens", "create", "--role", "member")
    assert code == 2
    assert await pool.fetchval("SELECT count(*) FROM api_tokens") == before
