"""Backend CPU of a one-job reservation: 0028's ``reserve_one`` against the set-based statement.

``python -m bench.reserve_one_cost [--calls 2000] [--rounds 2] [--accounts 200]`` in a
throw-away database (migrated, dropped afterwards); prints figures, records nothing. One
connection; each round calls ``reserve_batch_set`` (0011's body) and then ``reserve_batch``
(which sends a one-job call to ``reserve_one``) ``--calls`` times with a new job id each, one
credit, accounts round-robin (each funded with one purchased bucket, as the pipeline benches
do), all inside one transaction so that commits (WAL flushes) are not what is measured. CPU is
the backend's (``/proc/<pid>/stat``), per call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import asyncpg

from bench.ledger_reserve import create_database, drop_database, with_database
from bench.pipeline_procs import cpu_seconds
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.migrate import migrate

FUNCTIONS = ("reserve_batch_set", "reserve_batch")


async def run(args: argparse.Namespace) -> None:
    name = f"dispatcher_bench_reserve_one_{uuid.uuid4().hex[:8]}"
    await create_database(args.dsn, name)
    try:
        conn = await asyncpg.connect(with_database(args.dsn, name))
        try:
            await migrate(conn)
            store = CreditStore(conn)
            accounts = [f"r1-{i:04d}" for i in range(args.accounts)]
            for account in accounts:
                await create_account(conn, account)
                await store.grant(account, 10**12, "purchase", f"{account}-seed")
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            for rnd in range(args.rounds):
                for function in FUNCTIONS:
                    cpu, wall = cpu_seconds(pid), time.perf_counter()
                    async with conn.transaction():
                        for i in range(args.calls):
                            await conn.fetch(
                                f"SELECT * FROM {function}($1, $2::text[], $3::bigint[])",
                                accounts[i % len(accounts)], [f"{function}-{rnd}-{i}"], [1])
                    cpu, wall = cpu_seconds(pid) - cpu, time.perf_counter() - wall
                    print(f"round {rnd + 1} {function:18} backend CPU "
                          f"{cpu / args.calls * 1e6:5.0f} µs/call, wall "
                          f"{wall / args.calls * 1e6:5.0f} µs/call", flush=True)
        finally:
            await conn.close()
    finally:
        await drop_database(args.dsn, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--dsn", default=os.environ.get(
        "BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"))
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
