"""emit_job_event in plpgsql (0012) writes the outbox rows 0009's LANGUAGE sql version wrote,
but for a broadcast's recipients, whose events are ``status.broadcast.*`` since 0017."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import asyncpg
import pytest

OLD = "emit_job_event_0009"

# Every status a jobs row can have (its CHECK), so every one the code emits.
STATUSES = ["held", "sending", "retry_wait", "unknown", "sent", "delivered", "undelivered",
            "failed", "expired", "canceled"]
REASONS = [None, "insufficient_credits", "provider_error_30007", "broadcast_canceled",
           "resolved_not_sent_by_operator", "", "it's \"quoted\" \\ ünïcode"]
FULL_SMS = {
    "job_id": "job-1", "account_id": "acct-1", "kind": "sms", "priority": "bulk",
    "status": "sent", "payload": {"to": "x", "metadata": {"campaign": "c1", "n": [1, 2.5]}},
    "estimate": 3, "country": "US", "units": 3, "rate": 1, "broadcast_id": "bc-1",
    "attempts": 1, "provider_sid": "SM1", "final_cost": None,
}
JOBS: list[dict[str, Any]] = [
    FULL_SMS,
    # Settled: credits are the final cost, even 0.
    {**FULL_SMS, "final_cost": 2},
    {**FULL_SMS, "final_cost": 0},
    # A call: no segments; no metadata, no SID, no broadcast.
    {"job_id": "job-2", "account_id": "acct-1", "kind": "call", "priority": "transactional",
     "status": "sending", "payload": {"to": "x"}, "estimate": 10, "units": 2, "rate": 5},
    # metadata that is JSON null or not an object is echoed as it is; a NULL payload as {}.
    {**FULL_SMS, "payload": {"metadata": None}},
    {**FULL_SMS, "payload": {"metadata": "text"}},
    {**FULL_SMS, "payload": None},
    # Every field the event reads is NULL but the routing key's.
    {"job_id": None, "account_id": None, "kind": "sms", "units": None, "estimate": None},
]
CASES = list(itertools.product(JOBS, STATUSES, REASONS))
CALL = "SELECT {}(jsonb_populate_record(NULL::jobs, $1::jsonb), $2, $3)"


def old_emit_job_event_sql() -> str:
    """Migration 0009's ``emit_job_event`` (replaced by 0012), verbatim but for its name."""
    text = resources.files("dispatcher").joinpath(
        "sql", "migrations", "0009_status_event_keys.sql").read_text(encoding="utf-8")
    match = re.search(r"CREATE OR REPLACE FUNCTION emit_job_event\(.*?\n\$\$;", text, re.DOTALL)
    assert match is not None
    assert "LANGUAGE sql" in match.group(0)
    return match.group(0).replace("FUNCTION emit_job_event(", f"FUNCTION {OLD}(", 1)


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(database_url)
    await c.execute(old_emit_job_event_sql())
    yield c
    await c.close()


async def emit(conn: asyncpg.Connection, function: str, job: dict[str, Any] | None,
               status: str | None, reason: str | None) -> None:
    await conn.execute(CALL.format(function), None if job is None else json.dumps(job), status,
                       reason)


async def written_since(conn: asyncpg.Connection, last_id: int) -> list[dict[str, Any]]:
    """The outbox rows after ``last_id``: every column but the generated id and event id (the
    body's text too, so a number or null typed differently would show), and the event id the
    row and its body carry."""
    rows = await conn.fetch(
        "SELECT (to_jsonb(o) - 'id' - 'event_id' - 'body')::text AS columns,"
        "       (o.body - 'event_id')::text AS body, o.event_id::text AS event_id,"
        "       o.body ->> 'event_id' AS body_event_id"
        "  FROM outbox o WHERE o.id > $1 ORDER BY o.id", last_id)
    return [dict(r) for r in rows]


def as_since_0017(row: dict[str, Any]) -> tuple[str, str]:
    """0009's row as 0017 writes it: a broadcast's recipient is kind ``broadcast``."""
    columns, body = row["columns"], row["body"]
    if json.loads(body)["broadcast_id"] is not None:
        kind = f'"kind": "{json.loads(body)["kind"]}"'
        body = body.replace(kind, '"kind": "broadcast"')
        columns = re.sub(r'"routing_key": "status\.[a-z]+\.', '"routing_key": "status.broadcast.',
                         columns)
    return columns, body


async def test_emit_job_event_is_plpgsql(conn: asyncpg.Connection) -> None:
    language = await conn.fetchval(
        "SELECT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang"
        " WHERE p.oid = 'emit_job_event(jobs, text, text)'::regprocedure")
    assert language == "plpgsql"


async def test_writes_the_rows_0009_wrote(conn: asyncpg.Connection) -> None:
    last_id = await conn.fetchval("SELECT coalesce(max(id), 0) FROM outbox")
    # One transaction: now(), so occurred_at and created_at, is the same for both.
    async with conn.transaction():
        for job, status, reason in CASES:
            await emit(conn, OLD, job, status, reason)
            await emit(conn, "emit_job_event", job, status, reason)
        rows = await written_since(conn, last_id)

    assert len(rows) == 2 * len(CASES)
    for row in rows:
        assert row["body_event_id"] == row["event_id"]
    assert len({row["event_id"] for row in rows}) == len(rows)
    old, new = rows[0::2], rows[1::2]
    assert [(r["columns"], r["body"]) for r in new] == [as_since_0017(r) for r in old]

    # Not two identical wrong answers: the first case's event as the contract has it.
    first = json.loads(new[0]["body"])
    columns = json.loads(new[0]["columns"])
    assert columns["exchange"] == "events"
    assert columns["routing_key"] == "status.broadcast.held"
    assert columns["published_at"] is None
    assert first == {
        "schema_version": 1, "job_id": "job-1", "account": "acct-1", "kind": "broadcast",
        "status": "held", "reason": None, "provider_sid": "SM1", "segments": 3, "credits": 3,
        "metadata": {"campaign": "c1", "n": [1, 2.5]}, "broadcast_id": "bc-1",
        "occurred_at": first["occurred_at"]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["occurred_at"])


@pytest.mark.parametrize(("job", "status"), [
    (FULL_SMS, None), ({**FULL_SMS, "kind": None}, "sent"), (None, "sent")],
    ids=["null-status", "null-kind", "null-job"])
async def test_fails_where_0009_failed(conn: asyncpg.Connection, job: dict[str, Any] | None,
                                       status: str | None) -> None:
    for function in (OLD, "emit_job_event"):
        with pytest.raises(asyncpg.NotNullViolationError, match="routing_key"):
            await emit(conn, function, job, status, None)


async def test_wakes_the_relay(conn: asyncpg.Connection, database_url: str) -> None:
    listener = await asyncpg.connect(database_url)
    woken = asyncio.Event()
    try:
        await listener.add_listener("dispatcher_outbox", lambda *_: woken.set())
        await emit(conn, "emit_job_event", FULL_SMS, "sent", None)
        await asyncio.wait_for(woken.wait(), 10)
    finally:
        await listener.close()
