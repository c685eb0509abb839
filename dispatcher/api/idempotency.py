"""Idempotency-Key handling for billing requests: run once, replay the stored response after.

The record is claimed and completed in the same transaction as the change it guards: a
concurrent request with the same key waits on the unique key, then replays; a request that
fails leaves no record, so it may be retried with the same key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web
from pydantic import BaseModel

from dispatcher.api.errors import IdempotencyConflict
from dispatcher.db import Connection
from dispatcher.queries import q

Outcome = tuple[int, dict[str, Any]]
Perform = Callable[[Connection], Awaitable[Outcome]]
ACQUIRE_TIMEOUT_SECONDS = 10.0


def fingerprint(operation: str, body: BaseModel) -> bytes:
    """What makes two requests "the same": the operation and the validated body."""
    return hashlib.sha256(f"{operation}\n{body.model_dump_json()}".encode()).digest()


async def run_once(pool: asyncpg.Pool, account: str, key: str, token_id: str,
                   request_hash: bytes, perform: Perform) -> web.Response:
    """Run ``perform`` once per (account, key); replay its response for the same request."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_SECONDS) as conn, conn.transaction():
        claimed = await conn.fetchval(q("api_idempotency_claim"), account, key, request_hash,
                                      token_id)
        if not claimed:
            return _replay(await conn.fetchrow(q("api_idempotency_get"), account, key),
                           request_hash)
        status, body = await perform(conn)
        await conn.execute(q("api_idempotency_complete"), account, key, status,
                           json.dumps(body))
    return web.json_response(body, status=status)


def _replay(row: Any, request_hash: bytes) -> web.Response:
    if bytes(row["request_hash"]) != request_hash or row["status"] is None:
        raise IdempotencyConflict()
    return web.json_response(json.loads(row["body"]), status=row["status"],
                             headers={"Idempotent-Replayed": "true"})
