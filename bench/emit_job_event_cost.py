"""Per-call cost of emit_job_event: 0009's LANGUAGE sql version against 0012's plpgsql one.

``python -m bench.emit_job_event_cost [--calls 10000] [--rounds 5]`` in a throw-away database
(migrated, dropped afterwards); prints figures, records nothing. One connection, so both
versions run in the same session, alternately, each round in a transaction rolled back:

- direct: ``PERFORM`` in a plpgsql loop, as the job functions call it; time per call from
  ``pg_stat_xact_user_functions`` (``track_functions = 'all'``, which times every call of both)
  and from the loop's wall clock.
- hot path: the ``jobs_accepted`` query (job_accepted per job, one ``sent`` event each) over
  ``--calls`` sending jobs, with emit_job_event defined as 0009's, then as 0012's; time per job
  inside job_accepted, and the query's wall clock per job.

Also printed: calls of the LANGUAGE sql helper job_status_rank seen by the statistics on the
callback path (only plan-time constant folding is counted; inlined calls are not).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
import uuid
from importlib import resources

import asyncpg

from dispatcher.migrate import migrate
from dispatcher.queries import q

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
OLD = "emit_job_event_0009"


def migration_function(migration: str, name: str) -> str:
    text = resources.files("dispatcher").joinpath(
        "sql", "migrations", migration).read_text(encoding="utf-8")
    match = re.search(rf"CREATE OR REPLACE FUNCTION {name}\(.*?\n(END )?\$\$;", text, re.DOTALL)
    if match is None:
        raise RuntimeError(f"{name} not found in {migration}")
    return match.group(0)


OLD_SQL = migration_function("0009_status_event_keys.sql", "emit_job_event")
NEW_SQL = migration_function("0012_plpgsql_emit_job_event.sql", "emit_job_event")

DIRECT = """
DO $$
DECLARE
    j jobs := ROW('job-1', 'acct-1', 'sms', 'bulk', 'sent', '{"metadata": {"c": 1}}', 3, 'US',
                  3, 1, 'bc-1', NULL, 1, 'SM1', NULL, NULL, NULL, NULL, now(), now(), now(),
                  now())::jobs;
    t0 timestamptz := clock_timestamp();
BEGIN
    FOR i IN 1..%(calls)s LOOP
        PERFORM %(function)s(j, 'sent', NULL);
    END LOOP;
    PERFORM set_config('bench.wall_us', (extract(epoch FROM clock_timestamp() - t0)
                                         * 1e6)::text, true);
END $$
"""


async def function_stats(conn: asyncpg.Connection, name: str) -> tuple[int, float]:
    """(calls, total ms) of ``name`` this session has not reported yet. Inside a transaction
    block nothing is reported, so the difference of two readings there is what ran between."""
    row = await conn.fetchrow("SELECT calls, total_time FROM pg_stat_xact_user_functions"
                              " WHERE funcname = $1", name)
    return (0, 0.0) if row is None else (int(row["calls"]), float(row["total_time"]))


async def function_us(conn: asyncpg.Connection, name: str,
                      before: tuple[int, float]) -> tuple[int, float]:
    """(calls, µs per call) of ``name`` since ``before`` (a function_stats reading)."""
    calls, total = await function_stats(conn, name)
    n = calls - before[0]
    return n, (total - before[1]) * 1000 / max(n, 1)


async def direct(conn: asyncpg.Connection, function: str, calls: int) -> tuple[float, float]:
    """(µs per call from the statistics, µs per call of the loop); rolled back."""
    tr = conn.transaction()
    await tr.start()
    try:
        before = await function_stats(conn, function)
        await conn.execute(DIRECT % {"calls": calls, "function": function})
        wall = float(await conn.fetchval("SELECT current_setting('bench.wall_us')")) / calls
        n, per_call = await function_us(conn, function, before)
        assert n == calls
        return per_call, wall
    finally:
        await tr.rollback()


async def accepted(conn: asyncpg.Connection, calls: int) -> tuple[float, float]:
    """job_accepted over ``calls`` new sending jobs; rolled back."""
    tr = conn.transaction()
    await tr.start()
    try:
        ids = [f"job-{uuid.uuid4().hex}" for _ in range(calls)]
        await conn.execute(
            "INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate,"
            " units, rate, attempts, sending_at)"
            " SELECT u, 'acct-1', 'sms', 'bulk', 'sending', '{\"metadata\": {\"c\": 1}}', 3, 3,"
            " 1, 1, now() FROM unnest($1::text[]) u", ids)
        ids.sort()
        before = await function_stats(conn, "job_accepted")
        t0 = time.perf_counter()
        rows = await conn.fetch(q("jobs_accepted"), ids, [f"SM{i}" for i in ids])
        wall = (time.perf_counter() - t0) * 1e6 / calls
        assert all(r["status"] == "sent" for r in rows)
        n, per_job = await function_us(conn, "job_accepted", before)
        assert n == calls
        return per_job, wall
    finally:
        await tr.rollback()


async def rank_calls(conn: asyncpg.Connection, calls: int) -> int:
    """job_status_rank calls the statistics see over ``calls`` job_provider_status calls."""
    tr = conn.transaction()
    await tr.start()
    try:
        await conn.execute(
            "INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate)"
            " SELECT 'rank-' || g, 'acct-1', 'sms', 'bulk', 'sending', '{}', 1"
            "   FROM generate_series(1, $1) g", calls)
        before = await function_stats(conn, "job_status_rank")
        await conn.execute(
            "SELECT job_provider_status('rank-' || g, NULL, 'sent', NULL, NULL, false)"
            "  FROM generate_series(1, $1) g", calls)
        n, _ = await function_us(conn, "job_status_rank", before)
        return n
    finally:
        await tr.rollback()


def show(label: str, old: list[float], new: list[float]) -> None:
    mo, mn = statistics.median(old), statistics.median(new)
    print(f"{label:<44} {mo:8.1f} µs {mn:8.1f} µs   {mo / mn:4.1f}x   "
          f"old {', '.join(f'{x:.0f}' for x in old)} | new {', '.join(f'{x:.0f}' for x in new)}")


async def run(calls: int, rounds: int) -> None:
    name = f"bench_emit_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(ADMIN_DSN.rpartition("/")[0] + "/" + name)
        try:
            await migrate(conn)
            await conn.execute(OLD_SQL.replace("FUNCTION emit_job_event(", f"FUNCTION {OLD}(", 1))
            await conn.execute("INSERT INTO accounts (id) VALUES ('acct-1')")
            await conn.execute("SET track_functions = 'all'")
            await direct(conn, OLD, 100)  # warm both: catalog caches, plpgsql compile
            await direct(conn, "emit_job_event", 100)
            d_old: list[float] = []
            d_new: list[float] = []
            w_old: list[float] = []
            w_new: list[float] = []
            a_old: list[float] = []
            a_new: list[float] = []
            aw_old: list[float] = []
            aw_new: list[float] = []
            for r in range(rounds):
                order = [(OLD, d_old, w_old), ("emit_job_event", d_new, w_new)]
                for function, per_call, wall in order if r % 2 == 0 else order[::-1]:
                    c, w = await direct(conn, function, calls)
                    per_call.append(c)
                    wall.append(w)
                path = [(OLD_SQL, a_old, aw_old), (NEW_SQL, a_new, aw_new)]
                for sql, per_job, wall in path if r % 2 == 0 else path[::-1]:
                    await conn.execute(sql)
                    c, w = await accepted(conn, calls)
                    per_job.append(c)
                    wall.append(w)
            await conn.execute(NEW_SQL)
            ranks = await rank_calls(conn, calls)
        finally:
            await conn.close()
        version = await admin.fetchval("SHOW server_version")
        print(f"PostgreSQL {version}; {calls} calls x {rounds} rounds, medians "
              "(0009 LANGUAGE sql | 0012 plpgsql | ratio | per round)")
        show("emit_job_event, per call (function stats)", d_old, d_new)
        show("emit_job_event, per call (loop wall clock)", w_old, w_new)
        show("job_accepted + its event, per job (stats)", a_old, a_new)
        show("jobs_accepted query, per job (wall clock)", aw_old, aw_new)
        print(f"job_status_rank calls counted over {calls} job_provider_status calls: {ranks}")
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(run(args.calls, args.rounds))


if __name__ == "__main__":
    main()
