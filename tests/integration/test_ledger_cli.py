"""The ledger's CLI subcommands as an operator runs them: real processes, a real database."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[2]


async def cli(database_url: str, *args: str) -> tuple[int, str]:
    """Run ``python -m dispatcher ARGS``; its exit code and everything it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["DISPATCHER_DATABASE_URL"] = database_url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def ledger_rows(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM ledger"))


async def test_migrate_accounts_credits_balance_rates_and_audit(
        pool: asyncpg.Pool, database_url: str) -> None:
    code, out = await cli(database_url, "migrate")
    assert code == 0 and "none pending" in out  # the template was migrated: idempotent

    assert await cli(database_url, "accounts", "create", "cli-acct", "--allocation", "0") == (
        0, "created account cli-acct\n")
    code, out = await cli(database_url, "accounts", "create", "cli-acct")
    assert code == 2 and "error [" in out

    code, out = await cli(database_url, "credits", "grant", "cli-acct", "25", "--kind",
                          "purchase", "--reference", "pay-1")
    assert code == 0 and out.startswith("granted 25 purchase")
    code, out = await cli(database_url, "credits", "grant", "cli-acct", "25", "--kind",
                          "purchase", "--reference", "pay-1")
    assert code == 0 and out.startswith("already granted")
    before = await ledger_rows(pool)
    code, _ = await cli(database_url, "credits", "grant", "cli-acct", "0", "--reference", "p0")
    assert code == 2
    code, out = await cli(database_url, "credits", "grant", "nobody", "5", "--reference", "p2")
    assert code == 2 and "nobody" in out
    assert await ledger_rows(pool) == before

    code, out = await cli(database_url, "balance", "cli-acct")
    assert code == 0
    assert json.loads(out)["available"] == 25 and json.loads(out)["purchased"] == 25
    code, out = await cli(database_url, "balance", "nobody")
    assert code == 2 and "nobody" in out

    assert (await cli(database_url, "rates", "set", "sms", "jm", "7"))[0] == 0
    assert (await cli(database_url, "rates", "set", "call", "default", "3"))[0] == 0
    code, out = await cli(database_url, "rates", "set", "sms", "JAM", "1")
    assert code == 2 and "database error" in out
    rates = {(r["channel"], r["country"]): r["credits"]
             for r in await pool.fetch("SELECT channel, country, credits FROM rates")}
    assert rates[("sms", "JM")] == 7 and rates[("call", "*")] == 3
    assert ("sms", "JA") not in rates

    code, out = await cli(database_url, "audit")
    assert code == 0 and "audit OK" in out
    await pool.execute("UPDATE accounts SET purchased_available = 26 WHERE id = 'cli-acct'")
    code, out = await cli(database_url, "audit")
    assert code == 1 and "cli-acct" in out and "purchased" in out
