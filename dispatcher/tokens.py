"""API bearer tokens: random secrets shown once, kept only as a SHA-256 hash; constant-time checks.

A token reads ``dsp_<token_id>_<secret>``: the public ``token_id`` finds the row, the secret is
compared by hash. An operator token has no account and may act on any account.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from dispatcher.errors import DispatcherError, UnknownAccount
from dispatcher.queries import q

ROLES: tuple[str, ...] = ("owner", "admin", "member", "service")
PREFIX = "dsp"
_TOKEN = re.compile(r"^dsp_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


class InvalidTokenSpec(DispatcherError):
    """A token needs a known role, and an account unless it is an operator token."""

    code = "invalid_token_spec"


class Executor(Protocol):
    """A pool or a connection."""

    async def execute(self, query: str, *args: Any) -> str: ...

    async def fetchrow(self, query: str, *args: Any) -> Any: ...


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's account (None for operators) and role."""

    token_id: str
    account_id: str | None
    role: str
    operator: bool

    def may_see(self, account_id: str) -> bool:
        """True when the token may act on ``account_id`` at all (tenant check)."""
        return self.operator or self.account_id == account_id


def hash_secret(secret: str) -> bytes:
    """The stored form of a token secret."""
    return hashlib.sha256(secret.encode("ascii")).digest()


def _check_spec(account_id: str | None, role: str, operator: bool, name: str) -> None:
    if role not in ROLES:
        raise InvalidTokenSpec(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if operator and account_id is not None:
        raise InvalidTokenSpec("an operator token acts on every account: give no account")
    if not operator and not account_id:
        raise InvalidTokenSpec("a token needs an account (or --operator)")
    if len(name) > 200:
        raise InvalidTokenSpec("a token name is at most 200 characters")


async def create_token(pool: Executor, account_id: str | None, role: str, *,
                       operator: bool = False, name: str = "") -> str:
    """Create a token and return its plaintext, which is never stored and cannot be shown again."""
    _check_spec(account_id, role, operator, name)
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    try:
        await pool.execute(q("api_token_insert"), token_id, hash_secret(secret), account_id,
                           role, operator, name)
    except asyncpg.ForeignKeyViolationError as exc:
        raise UnknownAccount(f"no account {account_id!r}", account_id=account_id) from exc
    return f"{PREFIX}_{token_id}_{secret}"


async def authenticate(db: Executor, token: str) -> Principal | None:
    """The principal of a valid, unrevoked token; None otherwise."""
    match = _TOKEN.match(token)
    if match is None:
        return None
    token_id, secret = match.groups()
    row = await db.fetchrow(q("api_token_lookup"), token_id)
    if row is None or not hmac.compare_digest(bytes(row["secret_hash"]), hash_secret(secret)):
        return None
    return Principal(token_id, row["account_id"], row["role"], row["operator"])


async def revoke_token(db: Executor, token_id: str) -> bool:
    """Revoke a token by its id (the part after ``dsp_``); False when none was active."""
    row = await db.fetchrow(q("api_token_revoke"), token_id)
    return row is not None
