"""The real commands, run the way an operator runs them: a mistake ends in one line that names
the cause and the fix, with exit code 2 and no traceback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from dispatcher.settings import DEFAULT_DATABASE_URL, Settings
from tests.acceptance.process import ROOT, settings_env
from tests.integration.dispatcher_fixture import drop_topology

SERVER_URL = DEFAULT_DATABASE_URL.rsplit("/", 1)[0]


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("DISPATCHER_", "BILLING_"))}
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)


def one_line_error(result: subprocess.CompletedProcess[str], *, last: bool = False) -> str:
    """The single line the command printed on stderr (with ``last``: the last line, after
    the service's own logs), after checking it failed with code 2 and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert last or len(lines) == 1, result.stderr
    return lines[-1]


@pytest.mark.parametrize(("variable", "value", "accepted"), [
    ("DISPATCHER_HTTP_PORT", "abc", "a whole number from 1 to 65535"),
    ("DISPATCHER_HTTP_PORT", "70000", "a whole number from 1 to 65535"),
    ("DISPATCHER_LOG_FORMAT", "xml", "one of console, json"),
    ("DISPATCHER_LOG_LEVEL", "verbose", "one of debug, info, warning, error, critical"),
    ("DISPATCHER_PREFETCH", "0", "a whole number, at least 1"),
    ("DISPATCHER_TWILIO_TIMEOUT_SECONDS", "-1", "a number above 0"),
])
def test_a_bad_setting_stops_start_up_naming_it(variable: str, value: str,
                                                accepted: str) -> None:
    line = one_line_error(run("dispatcher", "run", env={variable: value}))
    assert line == f"error [invalid_setting]: {variable}={value!r} is not accepted: use {accepted}"


@pytest.mark.parametrize("module", ["dispatcher.sandbox", "dispatcher.demo.services"])
def test_the_other_entry_points_refuse_a_bad_setting_the_same_way(module: str) -> None:
    line = one_line_error(run(module, env={"DISPATCHER_LOG_FORMAT": "xml"}))
    assert "DISPATCHER_LOG_FORMAT='xml'" in line and "console, json" in line


@pytest.mark.parametrize("argv", [("run",), ("migrate",), ("accounts", "show", "acme"),
                                  ("tokens", "create", "--operator", "--role", "admin")])
def test_a_missing_database_says_how_to_create_it(argv: tuple[str, ...]) -> None:
    name = f"missing_{uuid.uuid4().hex[:10]}"
    line = one_line_error(run("dispatcher", *argv,
                              env={"DISPATCHER_DATABASE_URL": f"{SERVER_URL}/{name}"}))
    assert f"database {name} does not exist" in line
    assert f"`createdb -h 127.0.0.1 -U postgres {name}`" in line
    assert "not reachable" not in line


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"unmigrated_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(f"{SERVER_URL}/postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{SERVER_URL}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.mark.parametrize("argv", [("run",), ("accounts", "create", "acme"), ("audit",)])
def test_an_unmigrated_database_says_run_migrate(empty_database: str,
                                                 argv: tuple[str, ...]) -> None:
    line = one_line_error(run("dispatcher", *argv,
                              env={"DISPATCHER_DATABASE_URL": empty_database}))
    assert "not migrated" in line and "run `dispatcher migrate`" in line


def test_postgres_down_still_says_not_reachable() -> None:
    line = one_line_error(run("dispatcher", "migrate", env={
        "DISPATCHER_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/dispatcher"}))
    assert "PostgreSQL is not reachable" in line


async def test_a_taken_http_port_is_named_not_a_traceback(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            result = await asyncio.to_thread(
                run, "dispatcher", "run", env={**settings_env(settings),
                                               "DISPATCHER_HTTP_PORT": str(port)})
        finally:
            await drop_topology(settings)
    line = one_line_error(result, last=True)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "DISPATCHER_HTTP_PORT" in line


@pytest.mark.parametrize(("variable", "value", "accepted"), [
    ("BILLING_LOG_FORMAT", "xml", "one of console, json"),
    ("BILLING_MAX_ATTEMPTS", "three", "a whole number"),
])
def test_the_billing_reference_refuses_a_bad_setting_in_one_line(variable: str, value: str,
                                                                 accepted: str) -> None:
    line = one_line_error(run("billing_client.reference", "run", env={variable: value}))
    assert line == f"error: {variable}={value!r} is not accepted: use {accepted}"


def test_a_refused_login_is_not_called_unreachable() -> None:
    line = one_line_error(run("dispatcher", "migrate", env={
        "DISPATCHER_DATABASE_URL": "postgresql://no_such_role@127.0.0.1:5432/postgres"}))
    assert "PostgreSQL refused the connection" in line and "no_such_role" in line
    assert "DISPATCHER_DATABASE_URL" in line and "not reachable" not in line
