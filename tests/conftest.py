"""Shared fixtures: a migrated template database per run, a fresh clone per test module."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import asyncpg
import pytest

from dispatcher.migrate import migrate
from dispatcher.settings import Settings

ADMIN_DSN = os.environ.get("DISPATCHER_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
RUN_ID = uuid.uuid4().hex[:8]


def dsn_for(database: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


async def _admin(sql: str) -> None:
    try:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
    except OSError as exc:
        pytest.exit(
            f"PostgreSQL is not reachable at {ADMIN_DSN} ({exc}). Start it with: "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            returncode=3,
        )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _create_template(name: str) -> None:
    await _admin(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(dsn_for(name))
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def _drop(name: str) -> None:
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    """A database migrated once per test run, cloned for each test module."""
    name = f"dispatcher_tmpl_{RUN_ID}"
    asyncio.run(_create_template(name))
    yield name
    asyncio.run(_drop(name))


def _new_database(template: str) -> str:
    name = f"dispatcher_t_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    return name


@pytest.fixture(scope="module")
def database_url(template_db: str) -> Iterator[str]:
    """A fresh database for this test module, dropped after it."""
    name = _new_database(template_db)
    yield dsn_for(name)
    asyncio.run(_drop(name))


@pytest.fixture
def fresh_database_url(template_db: str) -> Iterator[str]:
    """A fresh database for one test, for tests that need an empty ledger."""
    name = _new_database(template_db)
    yield dsn_for(name)
    asyncio.run(_drop(name))


@pytest.fixture
def settings(database_url: str) -> Settings:
    prefix = f"t{RUN_ID}{uuid.uuid4().hex[:6]}"
    return replace(Settings(), database_url=database_url, amqp_prefix=prefix,
                   log_format="console")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=10, command_timeout=60)
    assert p is not None
    yield p
    await p.close()
