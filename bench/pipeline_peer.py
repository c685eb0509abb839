"""The dispatcher beside the idiomatic build at Twilio-like latency (issue 15).

``python -m bench.pipeline_peer [--rounds 3] [--jobs 5000] [--accounts 1000] [--record]``

One throw-away database, AMQP prefix and sandbox (``bench.pipeline.environment``), the same
accounts funded for both builds. Each round measures, in this order (the two builds swap places
every other round):

- 0 ms: the dispatcher at its defaults (200 in flight) and the peer at prefetch 64;
- 100 ms, 64 in flight: the dispatcher with ``DISPATCHER_MAX_IN_FLIGHT=64``, the peer at
  prefetch 64;
- 100 ms, 200 in flight: both at 200;
- 300 ms, 200 in flight: the dispatcher only.

Each measurement starts the build, waits until it is ready (the dispatcher's ``/readyz``, the
peer's ``ready`` line), reads the CPU counters, then publishes ``--jobs`` one-segment SMS jobs
round-robin over the accounts (confirmed, in windows of 500: faster than either build drains
them, so a backlog forms at once) and waits until every job is sent. Publishing after ready
keeps start-up out of the CPU figures (a backlog published first is partly drained before a
dispatcher reports ready). Rate = jobs / (last
``sent_at`` - first ``created_at``) from each build's own job rows. Worker CPU per job = the
process's CPU from ready to the last job / jobs. PostgreSQL CPU per job = the CPU of the
backends serving the build's connections (``application_name`` ``dispatcher*`` or ``peer``),
read from ``/proc/<pid>/stat`` every 0.5 s from ready to the end (a backend born meanwhile counts
from zero) / jobs. Checks after each: every job sent once at the sandbox (creates with distinct
bodies = jobs), reserved/charged once (one reservation per job; for the peer one ledger
capture per job and the balances down by exactly the credits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from bench import pipeline_report as report
from bench.broadcast_dbstats import database_stats, format_stats
from bench.ledger_reserve import machine, run_loop
from bench.peer_idiomatic import SCHEMA
from bench.pipeline import Bench, environment, start_py_spy
from bench.pipeline_jobs import Batch, make_batch, publish, span
from bench.pipeline_procs import (
    ROOT,
    Dispatcher,
    ProcessCpu,
    cpu_seconds,
    http_json,
    listener_pid,
    run_bare_consumer,
)

SECTION = "## Dispatcher beside the idiomatic build at Twilio-like latency (issue 15)"
FINDINGS_START = "<!-- issue15 findings -->"
FINDINGS_END = "<!-- /issue15 findings -->"
BACKENDS = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND (application_name LIKE 'dispatcher%' OR application_name = 'peer')")
STALL_SECONDS = 60.0
# The machine's RabbitMQ node: its CPU per job counts toward the machine's bound.
BROKER = ProcessCpu(listener_pid(5672))


@dataclass(frozen=True)
class Scenario:
    """One measured configuration: latency, calls in flight, and whether the peer runs too."""

    name: str
    latency_ms: int
    in_flight: int
    peer_prefetch: int | None
    floor: bool = False  # also the floor (consume + create + ack), at the peer's prefetch


SCENARIOS = (
    Scenario("0 ms", 0, 200, 64, floor=True),
    Scenario("100 ms, 64 in flight", 100, 64, 64, floor=True),
    Scenario("100 ms, 200 in flight", 100, 200, 200),
    Scenario("300 ms, 200 in flight", 300, 200, None),
)


@dataclass(frozen=True)
class Measured:
    rate: float
    cpu_us: float
    pg_us: float
    sandbox_us: float = 0.0  # the sandbox's CPU per job (Twilio's, in production)
    broker_us: float = 0.0  # RabbitMQ's node (beam.smp), all of it, while this build ran

    @property
    def cpu_bound(self) -> float:
        """Jobs/s the machine's cores would allow if this build, its backends, the sandbox
        and the broker had them all (the broker's figure includes the bench's publishing)."""
        total = self.cpu_us + self.pg_us + self.sandbox_us + self.broker_us
        return (os.cpu_count() or 1) * 1e6 / total if total else float("nan")


@dataclass
class Figures:
    ours: dict[str, list[Measured]] = field(default_factory=dict)
    peer: dict[str, list[Measured]] = field(default_factory=dict)
    floor: dict[str, list[Measured]] = field(default_factory=dict)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class BackendCpu:
    """CPU of the builds' PostgreSQL backends, polled so that none exiting early is lost."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}

    async def _read(self) -> dict[int, float]:
        found: dict[int, float] = {}
        for row in await self._pool.fetch(BACKENDS):
            with contextlib.suppress(OSError):
                found[row["pid"]] = cpu_seconds(row["pid"])
        return found

    async def begin(self) -> None:
        self._start = await self._read()
        self._last = dict(self._start)

    async def poll(self) -> None:
        self._last.update(await self._read())

    def seconds(self) -> float:
        return sum(cpu - self._start.get(pid, 0.0) for pid, cpu in self._last.items())


async def sandbox_creates(b: Bench) -> tuple[int, int]:
    """(creates, distinct bodies) the sandbox recorded since its last reset."""
    found = await asyncio.to_thread(http_json, f"{b.sandbox.base_url}/_sandbox/creates")
    assert isinstance(found, dict)
    creates = found["creates"]
    return len(creates), len({c["body"] for c in creates})


async def check_sent_once(b: Bench, batch: Batch, who: str) -> None:
    creates, distinct = await sandbox_creates(b)
    if creates != batch.size or distinct != batch.size:
        raise RuntimeError(f"{who} {batch.tag}: {creates} creates, {distinct} distinct bodies, "
                           f"{batch.size} jobs")


async def ours(b: Bench, batch: Batch, sc: Scenario, profile: Path | None = None,
               py_spy: Path | None = None) -> Measured:
    dispatcher = Dispatcher(replace(b.settings, max_in_flight=sc.in_flight),
                            b.logs / "dispatcher.log",
                            None if profile is None else profile / f"{batch.tag}.prof")
    await asyncio.to_thread(dispatcher.start)
    backends = BackendCpu(b.pool)
    try:
        await backends.begin()
        sandbox_cpu = b.sandbox.cpu()
        BROKER.start()
        spy = start_py_spy(None if py_spy is None else py_spy / f"{batch.tag}.txt",
                           dispatcher.child_pid)
        await publish(b.channel, b.names, batch)
        await wait_done(b.pool, batch, backends, "jobs")
        cpu = dispatcher.cpu_since_start()
        sandbox_cpu = b.sandbox.cpu() - sandbox_cpu
        broker_cpu = BROKER.seconds()
        if spy is not None:
            await asyncio.to_thread(spy.wait, 120)
    finally:
        await asyncio.to_thread(dispatcher.stop)
    result = await span(b.pool, batch.tag)
    reservations = await b.pool.fetchval(
        "SELECT count(DISTINCT job_id) FROM reservations WHERE job_id LIKE $1", batch.tag + "-%")
    if result.sent != batch.size or reservations != batch.size:
        raise RuntimeError(f"{batch.tag}: {result.sent} sent, {reservations} reserved")
    await check_sent_once(b, batch, "dispatcher")
    return Measured(result.rate, cpu / batch.size * 1e6, backends.seconds() / batch.size * 1e6,
                    sandbox_cpu / batch.size * 1e6, broker_cpu / batch.size * 1e6)


async def wait_done(pool: asyncpg.Pool, batch: Batch, backends: BackendCpu, table: str,
                    done: asyncio.Future[object] | None = None) -> None:
    """Until every job of the batch is sent (or ``done`` finished), polling the backends."""
    last_count, last_progress = -1, time.monotonic()
    while done is None or not done.done():
        await backends.poll()
        count = int(await pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE job_id LIKE $1 AND sent_at IS NOT NULL",
            batch.tag + "-%"))
        if count >= batch.size:
            return
        now = time.monotonic()
        if count != last_count:
            last_count, last_progress = count, now
        elif now - last_progress > STALL_SECONDS:
            raise RuntimeError(f"{batch.tag}: stalled at {count:,} sent")
        await asyncio.sleep(0.5)


async def peer(b: Bench, batch: Batch, sc: Scenario, dsn: str) -> Measured:
    assert sc.peer_prefetch is not None
    balance_before = await b.pool.fetchval("SELECT sum(balance) FROM peer_accounts")
    argv = [sys.executable, "-m", "bench.peer_idiomatic", "--amqp-url", b.settings.amqp_url,
            "--queue", b.names.work_queue(batch.priority), "--count", str(batch.size),
            "--prefetch", str(sc.peer_prefetch), "--dsn", dsn,
            "--twilio-base-url", b.sandbox.base_url, "--account-sid", b.sandbox.account_sid,
            "--auth-token", b.sandbox.auth_token]
    with (b.logs / "peer.log").open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        while (line := await asyncio.wait_for(proc.stdout.readline(), 60)) != b"ready\n":
            if not line:
                raise RuntimeError("peer exited before ready")
        backends = BackendCpu(b.pool)
        await backends.begin()
        sandbox_cpu = b.sandbox.cpu()
        BROKER.start()
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        await publish(b.channel, b.names, batch)
        finished = asyncio.ensure_future(proc.stdout.read())
        await wait_done(b.pool, batch, backends, "peer_jobs", finished)
        out = await asyncio.wait_for(finished, 60)
        sandbox_cpu = b.sandbox.cpu() - sandbox_cpu
        broker_cpu = BROKER.seconds()
        await backends.poll()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    result = json.loads(out.decode().strip().splitlines()[-1])
    row = await b.pool.fetchrow(
        "SELECT count(*) FILTER (WHERE status = 'sent') AS sent, sum(credits) AS credits,"
        "       extract(epoch FROM max(sent_at) - min(created_at))::float8 AS seconds,"
        "       (SELECT count(DISTINCT job_id) FROM peer_ledger"
        "         WHERE job_id LIKE $1 AND kind = 'capture') AS captured,"
        "       (SELECT count(*) FROM peer_ledger WHERE job_id LIKE $1) AS ledger_rows"
        "  FROM peer_jobs WHERE job_id LIKE $1", batch.tag + "-%")
    balance_after = await b.pool.fetchval("SELECT sum(balance) FROM peer_accounts")
    if not (row["sent"] == row["captured"] == row["ledger_rows"] == batch.size
            and balance_before - balance_after == row["credits"]):
        raise RuntimeError(f"peer {batch.tag}: {dict(row)}, balance down by "
                           f"{balance_before - balance_after}")
    await check_sent_once(b, batch, "peer")
    return Measured(batch.size / row["seconds"], result["cpu_seconds"] / batch.size * 1e6,
                    backends.seconds() / batch.size * 1e6, sandbox_cpu / batch.size * 1e6,
                    broker_cpu / batch.size * 1e6)


async def floor(b: Bench, batch: Batch, sc: Scenario) -> Measured:
    """``bench.pipeline_floor``: consume, one twilio create, ack; nothing else (no database).
    What any build on these parts spends per job at least; CPU from its first delivery."""
    assert sc.peer_prefetch is not None
    BROKER.start()  # the broker's share of publishing counts, as for the builds
    await publish(b.channel, b.names, batch)
    sandbox_cpu = b.sandbox.cpu()
    result = await asyncio.to_thread(
        run_bare_consumer, "bench.pipeline_floor", b.settings.amqp_url,
        b.names.work_queue(batch.priority), batch.size, sc.peer_prefetch,
        b.logs / "floor.log",
        ("--twilio-base-url", b.sandbox.base_url, "--account-sid", b.sandbox.account_sid,
         "--auth-token", b.sandbox.auth_token))
    creates, _ = await sandbox_creates(b)  # the floor sends one fixed body
    if creates != batch.size:
        raise RuntimeError(f"floor {batch.tag}: {creates} creates, {batch.size} messages")
    sandbox_cpu = b.sandbox.cpu() - sandbox_cpu
    return Measured(result["rate"], result["cpu_seconds"] / batch.size * 1e6, 0.0,
                    sandbox_cpu / batch.size * 1e6, BROKER.seconds() / batch.size * 1e6)


async def seed_peer(pool: asyncpg.Pool, accounts: list[str], credits: int) -> None:
    """The peer's tables, its accounts the dispatcher's, funded alike."""
    async with pool.acquire() as conn:
        await conn.execute(SCHEMA)
        await conn.executemany("INSERT INTO peer_accounts (id, balance) VALUES ($1, $2)",
                               [(a, credits) for a in accounts])


async def bench(args: argparse.Namespace) -> Figures:
    figures = Figures()
    async with environment(args) as b:
        # The bench's own queries on a pool apart, so the backends measured are the builds'.
        pool = await asyncpg.create_pool(b.settings.database_url, min_size=1, max_size=2,
                                         server_settings={"application_name": "bench"})
        assert pool is not None
        await b.pool.close()
        b.pool = pool
        await seed_peer(pool, b.accounts, 10**12)
        if args.db_stats:
            name = await pool.fetchval("SELECT current_database()")
            await pool.execute(f'ALTER DATABASE "{name}" SET track_functions = \'all\'')
        server_version = str(await pool.fetchval("SHOW server_version"))
        for rnd in range(args.rounds):
            for sc in SCENARIOS:
                if not sc.name.startswith(args.only):
                    continue
                sides = ["ours", "peer"] if sc.peer_prefetch is not None else ["ours"]
                if rnd % 2:
                    sides.reverse()
                if sc.floor:
                    sides.append("floor")
                for side in sides:
                    b.sandbox.configure(report.scenario(sc.latency_ms, False))
                    batch = make_batch(b.tag(f"i{side[0]}"), args.jobs, b.accounts)
                    if side == "ours":
                        m = await ours(b, batch, sc, args.profile, args.py_spy)
                        figures.ours.setdefault(sc.name, []).append(m)
                    elif side == "peer":
                        m = await peer(b, batch, sc, b.settings.database_url)
                        figures.peer.setdefault(sc.name, []).append(m)
                    else:
                        m = await floor(b, batch, sc)
                        figures.floor.setdefault(sc.name, []).append(m)
                    log(f"round {rnd + 1} {sc.name:24} {side:5} {m.rate:6,.0f} jobs/s, "
                        f"CPU {m.cpu_us:5,.0f} µs/job, PostgreSQL {m.pg_us:5,.0f} µs/job, "
                        f"sandbox {m.sandbox_us:4,.0f} µs/job, RabbitMQ {m.broker_us:4,.0f} µs/job")
        if args.db_stats:
            await asyncio.sleep(1)
            log(format_stats(await database_stats(pool, args.jobs)))
        await pool.close()
    text = section(figures, args, server_version)
    print(text)
    if args.record:
        report.record(text, SECTION)
        log(f"recorded in {report.RESULTS}")
    return figures


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cell(runs: list[Measured]) -> str:
    if not runs:
        return "—"
    rates, cpus, pgs = ([m.rate for m in runs], [m.cpu_us for m in runs],
                        [m.pg_us for m in runs])
    return (f"{med(rates):,.0f} jobs/s ({min(rates):,.0f}-{max(rates):,.0f}); "
            f"CPU {med(cpus):,.0f} µs/job ({min(cpus):,.0f}-{max(cpus):,.0f}); "
            f"PostgreSQL {med(pgs):,.0f} µs/job ({min(pgs):,.0f}-{max(pgs):,.0f}); "
            f"sandbox {med([m.sandbox_us for m in runs]):,.0f} µs/job; "
            f"RabbitMQ {med([m.broker_us for m in runs]):,.0f} µs/job; CPU bound "
            f"{med([m.cpu_bound for m in runs]):,.0f} jobs/s")


def floor_cell(runs: list[Measured]) -> str:
    if not runs:
        return "—"
    rates, cpus = [m.rate for m in runs], [m.cpu_us for m in runs]
    return (f"{med(rates):,.0f} msg/s ({min(rates):,.0f}-{max(rates):,.0f}); "
            f"CPU {med(cpus):,.0f} µs/msg ({min(cpus):,.0f}-{max(cpus):,.0f}); "
            f"sandbox {med([m.sandbox_us for m in runs]):,.0f} µs/msg; "
            f"RabbitMQ {med([m.broker_us for m in runs]):,.0f} µs/msg; CPU bound "
            f"{med([m.cpu_bound for m in runs]):,.0f} msg/s")


def verdicts(f: Figures) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for every target of the issue this run can judge."""
    def m(side: dict[str, list[Measured]], name: str, what: str) -> float:
        return med([getattr(x, what) for x in side.get(name, [])])
    z, l64, l200, l300 = (s.name for s in SCENARIOS)
    out: list[tuple[str, bool, str]] = []
    ratio = m(f.ours, l64, "cpu_us") / m(f.ours, z, "cpu_us")
    out.append(("dispatcher CPU/job at 100 ms / 64 ≤ 1.2x its 0 ms figure", ratio <= 1.2,
                f"{ratio:.2f}x"))
    ratio = m(f.ours, l64, "pg_us") / m(f.ours, z, "pg_us")
    out.append(("dispatcher PostgreSQL CPU/job at 100 ms / 64 ≤ 1.2x its 0 ms figure",
                ratio <= 1.2, f"{ratio:.2f}x"))
    for name in (z, l64):
        ratio = m(f.ours, name, "pg_us") / m(f.peer, name, "pg_us")
        out.append((f"{name}: PostgreSQL CPU/job ≤ the peer's", ratio <= 1.0, f"{ratio:.2f}x"))
    rate = m(f.ours, l64, "rate")
    out.append(("100 ms / 64 in flight: ≥ 576 jobs/s (90 % of 640)", rate >= 576,
                f"{rate:,.0f} jobs/s = {rate / 640:.0%}; what the CPU allows this build here: "
                f"{m(f.ours, l64, 'cpu_bound'):,.0f} jobs/s; the floor (no database): "
                f"{m(f.floor, l64, 'rate'):,.0f} msg/s, its CPU bound "
                f"{m(f.floor, l64, 'cpu_bound'):,.0f}"))
    rate = m(f.ours, l300, "rate")
    out.append(("300 ms / 200 in flight: ≥ 600 jobs/s (90 % of 667)", rate >= 600,
                f"{rate:,.0f} jobs/s = {rate / 666.7:.0%}"))
    for name in (z, l64):
        ratio = m(f.ours, name, "cpu_us") / m(f.peer, name, "cpu_us")
        half, bare = m(f.peer, name, "cpu_us") / 2, m(f.floor, name, "cpu_us")
        out.append((f"{name}: CPU/job ≤ 0.5x the peer's", ratio <= 0.5,
                    f"{ratio:.2f}x; half the peer's is {half:,.0f} µs, the floor alone "
                    f"{bare:,.0f} µs"))
    rate, bound = m(f.ours, l200, "rate"), m(f.ours, l200, "cpu_bound")
    out.append(("100 ms / 200 in flight: ≥ 90 % of what the CPU allows (cores / CPU per job of "
                "dispatcher + its backends + sandbox + RabbitMQ; 2,000/s in-flight bound is "
                "higher)",
                rate >= 0.9 * bound, f"{rate:,.0f} of {bound:,.0f} jobs/s = {rate / bound:.0%}"))
    ratio = m(f.ours, l200, "rate") / m(f.peer, l200, "rate")
    out.append(("100 ms / 200 in flight: ≥ 1.5x the peer's throughput", ratio >= 1.5,
                f"{ratio:.2f}x"))
    return out


def previous_findings() -> str:
    current = report.RESULTS.read_text(encoding="utf-8") if report.RESULTS.exists() else ""
    a, b = current.find(FINDINGS_START), current.find(FINDINGS_END)
    return current[a + len(FINDINGS_START):b] if 0 <= a < b else "\n"


def section(f: Figures, args: argparse.Namespace, server_version: str) -> str:
    rows = "\n".join(f"| {sc.name} | {cell(f.ours.get(sc.name, []))} | "
                     f"{cell(f.peer.get(sc.name, []))} | {floor_cell(f.floor.get(sc.name, []))} |"
                     for sc in SCENARIOS)
    targets = "\n".join(f"- {'met' if ok else '**missed**'}: {what} (measured {measured})"
                        for what, ok, measured in verdicts(f))
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min, at the end)"
    return f"""{SECTION}

Recorded {now} with `python -m bench.pipeline_peer --rounds {args.rounds} --jobs {args.jobs} \
--accounts {args.accounts} --record` (`make bench` runs it as `issue15`; alone:
`.venv/bin/python -m bench.run_all --only issue15`).

- Machine: {machine()}; load average {load}: compare ratios within this run.
- Versions: {report.versions(server_version)}.
- Method: see `bench/pipeline_peer.py`. {args.jobs:,} one-segment SMS jobs over
  {args.accounts:,} accounts per measurement, {args.rounds} interleaved rounds (the builds swap
  order every other round), one sandbox (`python -m dispatcher.sandbox`, status callbacks
  off), one database. *dispatcher* = `python -m dispatcher run` (prefetch 200, provider calls
  in flight as the row says, per-sender limit lifted). *peer* = `bench/peer_idiomatic.py`:
  aio-pika + asyncpg, prefetch as the row says, per job one transaction to reserve (lock the
  account row, check, update the balance, insert the job), one `messages.create_async` of the
  official twilio library over its stock `AsyncTwilioHttpClient`, one transaction to capture
  (job `sent`, a ledger row), one ack; no batching. CPU is per job, worker process only;
  PostgreSQL = the backends serving that build's connections. *floor* =
  `bench/pipeline_floor.py` at the peer's prefetch: consume, one twilio create, ack, nothing
  else (no database, no validation): what any build on these parts spends at least (its CPU
  counts from its first delivery). Medians (range).

| provider latency | dispatcher | peer (one transaction per step) | floor (no database) |
|---|---|---|---|
{rows}

Targets:
{targets}

{FINDINGS_START}{previous_findings()}{FINDINGS_END}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=5_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--dsn", default=os.environ.get(
        "BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--only", default="",
                        help="run only the scenarios whose name starts with this (diagnosis)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="run the dispatcher under cProfile, stats to DIR/<tag>.prof")
    parser.add_argument("--py-spy", type=Path, default=None,
                        help="sample the dispatcher with py-spy, stacks to DIR/<tag>.txt")
    parser.add_argument("--db-stats", action="store_true",
                        help="print per-function and per-table statistics at the end")
    args = parser.parse_args(argv)
    # What bench.pipeline's environment reads.
    args.callbacks, args.keep_logs, args.prefetch = False, None, 200
    args.in_flight, args.workers = 200, 0
    run_loop(bench(args))


if __name__ == "__main__":
    main()
