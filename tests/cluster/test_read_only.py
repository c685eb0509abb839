"""A multi-host DSN goes to the writable host; a read-only connection is an outage and dropped.

On a primary + standby pair: the hosts listed standby first, without ``target_session_attrs``,
still reach the primary (``primary_dsn`` adds ``read-write``); a pool that can only reach the
standby fails ``ping`` (the readiness and outage probe) instead of answering ready, and a write
there (SQLSTATE 25006, what a demoted or fenced primary answers) counts as an outage to wait
out, not a bug that stops the service.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import asyncpg
import pytest

from dispatcher.db import create_pool, ping, primary_dsn
from dispatcher.errors import ServiceUnavailable
from dispatcher.loops import is_outage
from dispatcher.settings import Settings
from tests.cluster.nodes import ReplicatedPostgres


def test_primary_dsn_adds_read_write_to_several_hosts_only() -> None:
    one = "postgresql://u@h1:5432/db"
    assert primary_dsn(one) == one
    assert primary_dsn("postgresql://u@h1:1,h2:2/db") == (
        "postgresql://u@h1:1,h2:2/db?target_session_attrs=read-write")
    assert primary_dsn("postgresql://u@h1:1,h2:2/db?sslmode=disable").endswith(
        "?sslmode=disable&target_session_attrs=read-write")
    chosen = "postgresql://u@h1:1,h2:2/db?target_session_attrs=any"
    assert primary_dsn(chosen) == chosen


async def test_the_writable_host_is_found_and_a_read_only_one_refused(
        replicated_postgres: ReplicatedPostgres) -> None:
    pg = replicated_postgres
    await asyncio.to_thread(pg.create_database, "ro")
    for _ in range(100):  # committed on the standby at once; replayed a moment later
        names = await asyncio.to_thread(
            pg.standby._run, "psql", "-h", "127.0.0.1", "-p", str(pg.standby.port), "-U",
            "postgres", "-Atc", "SELECT datname FROM pg_database")
        if "ro" in names.stdout.split():
            break
        await asyncio.sleep(0.1)
    standby_first = (f"postgresql://postgres@127.0.0.1:{pg.standby.port},"
                     f"127.0.0.1:{pg.primary.port}/ro")
    pool = await create_pool(replace(Settings(), database_url=standby_first), min_size=1,
                             max_size=2)
    try:
        assert await pool.fetchval("SELECT pg_is_in_recovery()") is False
        await ping(pool)
    finally:
        await pool.close()

    standby_only = replace(Settings(), database_url=pg.standby.dsn("ro"))
    pool = await create_pool(standby_only, min_size=1, max_size=2)
    try:
        with pytest.raises(ServiceUnavailable, match="read-only"):
            await ping(pool)
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError) as caught:
            await pool.execute("CREATE TABLE t (x int)")
        assert is_outage(caught.value)
    finally:
        await pool.close()
