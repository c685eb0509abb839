"""Jobs per second through the whole pipeline, beside the broker's own ceiling (issue 3).

Run as ``python -m bench.pipeline [--runs 3] [--jobs 20000] [--rss-jobs 200000] [--dispatchers N]
[--record]``.

Everything is real and in its own process: ``python -m dispatcher run`` configured by
``DISPATCHER_*`` variables, the Twilio sandbox (``python -m dispatcher.sandbox``), RabbitMQ and
PostgreSQL; this process only publishes and watches. It creates a throw-away database and a
unique AMQP prefix, and removes both at the end.

Each measurement publishes a backlog of one-segment SMS jobs (confirmed, persistent, as
``JobPublisher`` sends them) while no dispatcher runs, then starts the dispatcher and waits until
every job is ``sent``; the rate is jobs / (last ``sent_at`` - first ``created_at``), read from the
job rows. Measured:

1. **zero latency**: the sandbox answers at once; beside it, in the same run, the same backlog is
   drained by a bare aio-pika consume-and-ack loop (``bench.pipeline_raw``, its own process, same
   queue and prefetch) — the broker ceiling — and by the floor (``bench.pipeline_floor``: consume,
   one twilio-library create to the sandbox, ack; nothing else), the best any dispatcher on these
   parts could do. The order rotates between runs.
2. **100 ms latency**: every create takes 100 ms at the sandbox; the bound is jobs in flight /
   latency. Measured at ``--latency-in-flight`` provider calls (the target: a bound the CPU can
   carry, so the figure shows whether latency is hidden) and at ``--in-flight`` (CPU-bound here).
3. **memory and priority**: one ``--rss-jobs`` bulk backlog drained while the dispatcher's RSS is
   sampled; while at least ``--backlog`` bulk jobs are still queued, transactional jobs are
   published one at a time and their publish → sent latency is measured.

``--record`` replaces this benchmark's section of ``bench/RESULTS.md``, keeping the hand-written
findings between its ``<!-- findings -->`` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from bench import pipeline_report as report
from bench.ledger_reserve import create_database, drop_database, run_loop, with_database
from bench.pipeline_jobs import (
    Batch,
    make_batch,
    message,
    publish,
    queue_depth,
    sent_count,
    sent_times,
    span,
)
from bench.pipeline_procs import Dispatcher, Sandbox, run_bare_consumer
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.db import create_pool
from dispatcher.events.topology import Names, declare, delete_all
from dispatcher.migrate import migrate
from dispatcher.settings import Settings

LATENCY_MS = 100
# Transactional probes round-robin over their own accounts: one account's jobs begin one at a
# time (per-account arrival order), which would otherwise be what the probes measure.
TX_ACCOUNTS = [f"bench-tx-{i:02d}" for i in range(20)]
STALL_SECONDS = 60.0  # no job sent for this long: the measurement failed
PRIORITY_MARGIN = 20_000  # bulk jobs beyond --backlog, so probing can last a while


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Bench:
    """Everything one benchmark run holds."""

    args: argparse.Namespace
    settings: Settings
    pool: asyncpg.Pool
    channel: AbstractChannel
    # Never declares anything: a robust channel answers a passive declare of a queue it declared
    # itself from its cache, with the message count of that first declaration.
    depth_channel: AbstractChannel
    sandbox: Sandbox
    logs: Path
    accounts: list[str]
    runs: int = 0
    figures: report.Figures = field(default_factory=report.Figures)

    @property
    def names(self) -> Names:
        return Names(self.settings.amqp_prefix)

    def tag(self, what: str) -> str:
        self.runs += 1
        return f"{what}{self.runs:02d}"

    async def ours(self, batch: Batch, *, rss: bool = False, in_flight: int | None = None,
                   during: Coroutine[Any, Any, None] | None = None) -> report.Drained:
        """Publish the backlog, start the dispatcher(s), wait until every job is sent.

        With ``--dispatchers N`` the N processes compete for the same queues; CPU per job is
        their sum, RSS (with ``rss``) is the first one's.
        """
        seconds = await publish(self.channel, self.names, batch)
        log(f"  published {batch.size:,} in {seconds:.1f}s")
        dispatchers = [self._dispatcher(i, in_flight) for i in range(self.args.dispatchers)]
        # Before any starts: the first one ready consumes while the others are still starting.
        sandbox_cpu = self.sandbox.cpu()
        try:
            await asyncio.gather(*(asyncio.to_thread(d.start) for d in dispatchers))
        except BaseException:
            await asyncio.gather(*(asyncio.to_thread(d.stop) for d in dispatchers))
            raise
        first = dispatchers[0]
        spy = start_py_spy(self.args.py_spy, first.child_pid)
        side = asyncio.create_task(during) if during is not None else None
        try:
            await self._wait_sent(batch, first, rss)
            cpu = sum(d.cpu_since_start() for d in dispatchers)
            sandbox_cpu = self.sandbox.cpu() - sandbox_cpu
            stages = await asyncio.to_thread(first.stage_means)
            log(f"  per job: {report.stages_text(stages)}")
        finally:
            if side is not None:
                await side
            if spy is not None:
                await asyncio.to_thread(spy.wait, 120)
            await asyncio.gather(*(asyncio.to_thread(d.stop) for d in dispatchers))
        result = await span(self.pool, batch.tag)
        if result.sent != batch.size:
            raise RuntimeError(f"{batch.tag}: {result.sent} sent, {result.other} not")
        return report.Drained(result.rate, cpu / batch.size * 1e6,
                              sandbox_cpu / batch.size * 1e6, first.samples, stages)

    def _dispatcher(self, index: int, in_flight: int | None = None) -> Dispatcher:
        """The ``index``-th competing dispatcher: the first on the bench's settings."""
        settings = self.settings
        if in_flight is not None:
            settings = replace(settings, max_in_flight=in_flight)
        if index == 0:
            return Dispatcher(settings, self.logs / "dispatcher.log", self.args.profile)
        port = free_port()
        settings = replace(settings, http_port=port, public_base_url=f"http://127.0.0.1:{port}")
        return Dispatcher(settings, self.logs / f"dispatcher-{index}.log")

    async def _wait_sent(self, batch: Batch, dispatcher: Dispatcher, rss: bool) -> None:
        last_count, last_progress, polled = -1, time.monotonic(), 0.0
        while True:
            if rss:
                dispatcher.sample()
            now = time.monotonic()
            if now - polled >= 0.5:
                polled = now
                count = await sent_count(self.pool, batch.tag)
                if count >= batch.size:
                    return
                if count != last_count:
                    last_count, last_progress = count, now
                elif now - last_progress > STALL_SECONDS:
                    raise RuntimeError(f"{batch.tag}: stalled at {count:,} sent")
            await asyncio.sleep(0.25)

    async def raw(self, batch: Batch) -> tuple[float, float]:
        """Publish the same backlog and let the bare consume-and-ack loop drain it."""
        await publish(self.channel, self.names, batch)
        result = await asyncio.to_thread(
            run_bare_consumer, "bench.pipeline_raw", self.settings.amqp_url,
            self.names.work_queue(batch.priority), batch.size, self.settings.prefetch,
            self.logs / "raw.log")
        return result["rate"], result["cpu_seconds"] / batch.size * 1e6

    async def floor(self, batch: Batch) -> tuple[float, float, float]:
        """The same backlog through consume + one twilio create + ack, nothing else.

        Returns the rate and the CPU per message of the floor process and of the sandbox.
        """
        await publish(self.channel, self.names, batch)
        sandbox_cpu = self.sandbox.cpu()
        result = await asyncio.to_thread(
            run_bare_consumer, "bench.pipeline_floor", self.settings.amqp_url,
            self.names.work_queue(batch.priority), batch.size, self.settings.prefetch,
            self.logs / "floor.log",
            ("--twilio-base-url", self.sandbox.base_url, "--account-sid",
             self.sandbox.account_sid, "--auth-token", self.sandbox.auth_token))
        sandbox_cpu = self.sandbox.cpu() - sandbox_cpu
        return (result["rate"], result["cpu_seconds"] / batch.size * 1e6,
                sandbox_cpu / batch.size * 1e6)

    async def probes(self, started: asyncio.Event) -> None:
        """Transactional jobs, one at a time, while the bulk backlog is still deep."""
        await started.wait()
        exchange = await self.channel.get_exchange(self.names.jobs_exchange)
        batch = make_batch(self.tag("tx"), self.args.probes, TX_ACCOUNTS, "transactional")
        published: dict[str, tuple[float, int]] = {}
        for job_id, body in batch.bodies:
            depth = await queue_depth(self.depth_channel, self.names.work_queue("bulk"))
            if depth < self.args.backlog:
                log(f"  probing stopped: {depth:,} bulk jobs queued < {self.args.backlog:,}")
                break
            at = time.time()
            await exchange.publish(message(job_id, body), routing_key="sms.transactional",
                                   timeout=30)
            published[job_id] = (at, depth)
            await asyncio.sleep(self.args.probe_interval)
        deadline = time.monotonic() + 30
        sent: dict[str, float] = {}
        while time.monotonic() < deadline and len(sent) < len(published):
            sent = await sent_times(self.pool, list(published))
            await asyncio.sleep(0.2)
        self.figures.probes = [sent[j] - at if j in sent else float("inf")
                               for j, (at, _) in published.items()]
        self.figures.probe_depths = [depth for _, depth in published.values()]


def start_py_spy(path: Path | None, pid: int) -> subprocess.Popen[bytes] | None:
    """Sample the dispatcher with py-spy for 15 s (raw collapsed stacks) when asked to."""
    if path is None:
        return None
    return subprocess.Popen(["py-spy", "record", "-p", str(pid), "-d", "15", "-r", "250",
                             "-f", "raw", "--nonblocking", "-o", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def watch_first_sent(pool: asyncpg.Pool, tag: str, started: asyncio.Event) -> None:
    """Set ``started`` once the first job of the batch is sent."""
    while await sent_count(pool, tag) == 0:
        await asyncio.sleep(0.2)
    started.set()


async def zero_latency(b: Bench) -> None:
    if not b.args.jobs:
        return
    b.sandbox.configure(report.scenario(0, b.args.callbacks))
    for run in range(b.args.runs):
        sides = ("ours", "raw", "floor")
        for side in sides[run % 3:] + sides[:run % 3]:
            batch = make_batch(b.tag("z"), b.args.jobs, b.accounts)
            if side == "ours":
                drained = await b.ours(batch)
                b.figures.zero.append(drained.rate)
                b.figures.zero_cpu.append(drained.cpu_us)
                b.figures.sandbox_cpu.append(drained.sandbox_cpu_us)
                b.figures.stages.setdefault(
                    f"zero latency, {b.args.in_flight} in flight", []).append(drained.stages)
                log(f"run {run + 1} zero latency  ours {drained.rate:8,.0f} jobs/s "
                    f"(CPU per job: dispatcher {drained.cpu_us:.0f} µs, sandbox "
                    f"{drained.sandbox_cpu_us:.0f} µs)")
            elif side == "floor":
                rate, cpu_us, sandbox_us = await b.floor(batch)
                b.figures.floor.append(rate)
                b.figures.floor_cpu.append(cpu_us)
                b.figures.floor_sandbox_cpu.append(sandbox_us)
                log(f"run {run + 1} zero latency  floor {rate:7,.0f} msg/s (CPU per message: "
                    f"floor {cpu_us:.0f} µs, sandbox {sandbox_us:.0f} µs)")
            else:
                rate, cpu_us = await b.raw(batch)
                b.figures.raw.append(rate)
                b.figures.raw_cpu.append(cpu_us)
                log(f"run {run + 1} zero latency  raw  {rate:8,.0f} msg/s "
                    f"({cpu_us:.0f} µs CPU/message)")
            b.sandbox.configure(report.scenario(0, b.args.callbacks))


async def with_latency(b: Bench) -> None:
    if not b.args.latency_jobs:
        return
    for run in range(b.args.runs):
        for in_flight, rates in ((b.args.latency_in_flight, b.figures.latency),
                                 (b.args.in_flight, b.figures.latency_full)):
            b.sandbox.configure(report.scenario(LATENCY_MS, b.args.callbacks))
            drained = await b.ours(make_batch(b.tag("l"), b.args.latency_jobs, b.accounts),
                                   in_flight=in_flight)
            rates.append(drained.rate)
            b.figures.stages.setdefault(
                f"{LATENCY_MS} ms latency, {in_flight} in flight", []).append(drained.stages)
            log(f"run {run + 1} {LATENCY_MS} ms latency, {in_flight} in flight, ours "
                f"{drained.rate:8,.0f} jobs/s (CPU per job: dispatcher {drained.cpu_us:.0f} µs, "
                f"sandbox {drained.sandbox_cpu_us:.0f} µs)")


async def memory_and_priority(b: Bench) -> None:
    b.sandbox.configure(report.scenario(0, b.args.callbacks))
    batch = make_batch(b.tag("m"), b.args.rss_jobs, b.accounts)
    started = asyncio.Event()
    watcher = asyncio.create_task(watch_first_sent(b.pool, batch.tag, started))
    try:
        drained = await b.ours(batch, rss=True, during=b.probes(started))
    finally:
        watcher.cancel()
    b.figures.rss_rate = drained.rate
    b.figures.rss = drained.samples
    first, last = report.quarter_peaks(drained.samples)
    log(f"{batch.size:,} jobs at {drained.rate:,.0f} jobs/s; peak RSS first quarter "
        f"{first / 2**20:.1f} MiB, last quarter {last / 2**20:.1f} MiB")
    log(f"transactional probes: {report.latency_summary(b.figures.probes)}")


async def priority_only(b: Bench) -> None:
    """Probes behind a bulk backlog of at least ``--backlog`` jobs, without draining it."""
    b.sandbox.configure(report.scenario(0, b.args.callbacks))
    batch = make_batch(b.tag("p"), b.args.backlog + PRIORITY_MARGIN, b.accounts)
    seconds = await publish(b.channel, b.names, batch)
    log(f"  published {batch.size:,} in {seconds:.1f}s")
    dispatcher = Dispatcher(b.settings, b.logs / "dispatcher.log")
    dispatcher.start()
    started = asyncio.Event()
    watcher = asyncio.create_task(watch_first_sent(b.pool, batch.tag, started))
    try:
        await b.probes(started)
    finally:
        watcher.cancel()
        await asyncio.to_thread(dispatcher.stop)
    log(f"transactional probes: {report.latency_summary(b.figures.probes)}")


@contextlib.asynccontextmanager
async def environment(args: argparse.Namespace) -> AsyncIterator[Bench]:
    """Database, accounts, topology, sandbox; all removed afterwards."""
    token = secrets.token_hex(4)
    db_name = f"dispatcher_bench_pipeline_{token}"
    dsn = with_database(args.dsn, db_name)
    await create_database(args.dsn, db_name)
    connection: AbstractRobustConnection | None = None
    sandbox: Sandbox | None = None
    pool: asyncpg.Pool | None = None
    settings = Settings(database_url=dsn, amqp_prefix=f"bench_pipeline_{token}")
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                await migrate(conn)
            finally:
                await conn.close()
            pool = await create_pool(settings, min_size=1, max_size=4)
            accounts = await fund_accounts(pool, args.accounts, 10**12)
            sandbox = Sandbox(free_port(), "AC" + secrets.token_hex(16), secrets.token_hex(16),
                              Path(tmp) / "sandbox.log")
            sandbox.start(report.scenario(0, args.callbacks))
            settings = dispatcher_settings(settings, sandbox, args)
            connection = await aio_pika.connect_robust(settings.amqp_url)
            channel = await connection.channel(publisher_confirms=True)
            await declare(channel, Names(settings.amqp_prefix), settings.delivery_limit)
            depth_channel = await connection.channel()
            yield Bench(args, settings, pool, channel, depth_channel, sandbox, Path(tmp),
                        accounts)
        finally:
            if args.keep_logs and Path(tmp, "dispatcher.log").exists():
                os.replace(Path(tmp, "dispatcher.log"), args.keep_logs)
            if sandbox is not None:
                sandbox.stop()
            if connection is not None:
                await remove_topology(connection, Names(settings.amqp_prefix))
                await connection.close()
            if pool is not None:
                await pool.close()
            await drop_database(args.dsn, db_name)


async def remove_topology(connection: AbstractRobustConnection, names: Names) -> None:
    """Delete every queue and exchange of the prefix, the dispatcher's credits queue too."""
    channel = await connection.channel()
    try:
        await channel.queue_delete(f"{names.prefix}.credits")
        await delete_all(channel, names)
    except aio_pika.exceptions.AMQPError as exc:
        log(f"cleanup of {names.prefix} incomplete: {exc!r}")


def dispatcher_settings(base: Settings, sandbox: Sandbox, args: argparse.Namespace) -> Settings:
    port = free_port()
    return Settings(
        database_url=base.database_url, amqp_prefix=base.amqp_prefix, http_port=port,
        public_base_url=f"http://127.0.0.1:{port}", twilio_base_url=sandbox.base_url,
        twilio_account_sid=sandbox.account_sid, twilio_auth_token=sandbox.auth_token,
        # One sending number for every job: the per-sender limit would otherwise be the figure.
        sender_rate_per_second=1e9, prefetch=args.prefetch, max_in_flight=args.in_flight,
        workers=args.workers,
        log_format="json", log_level=args.log_level, shutdown_timeout_seconds=10.0)


async def fund_accounts(pool: asyncpg.Pool, n: int, credits: int) -> list[str]:
    accounts = [f"bench-{i:04d}" for i in range(n)]
    store = CreditStore(pool)
    for account in [*accounts, *TX_ACCOUNTS]:
        await create_account(pool, account)
        await store.grant(account, credits, "purchase", f"{account}-seed")
    return accounts


async def bench(args: argparse.Namespace) -> report.Figures:
    async with environment(args) as b:
        server_version = str(await b.pool.fetchval("SHOW server_version"))
        if args.priority_only:
            await priority_only(b)
        elif not args.skip_throughput:
            await zero_latency(b)
            await with_latency(b)
        if args.rss_jobs and not args.priority_only:
            await memory_and_priority(b)
        figures = b.figures
    text = (report.priority_section(figures, args, server_version) if args.priority_only
            else report.section(figures, args, server_version))
    print(text)
    if args.record:
        report.record(text, report.PRIORITY_SECTION if args.priority_only else report.SECTION)
        log(f"recorded in {report.RESULTS}")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20_000, help="zero-latency backlog")
    parser.add_argument("--latency-jobs", type=int, default=10_000, help="100 ms backlog")
    parser.add_argument("--rss-jobs", type=int, default=200_000,
                        help="memory/priority backlog (0 skips it)")
    parser.add_argument("--backlog", type=int, default=100_000,
                        help="probe only while at least this many bulk jobs are queued")
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--probe-interval", type=float, default=0.05)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--prefetch", type=int, default=Settings().prefetch)
    parser.add_argument("--in-flight", type=int, default=Settings().max_in_flight,
                        help="provider calls in flight (DISPATCHER_MAX_IN_FLIGHT)")
    parser.add_argument("--workers", type=int, default=Settings().workers,
                        help="jobs handled at once (DISPATCHER_WORKERS; 0: the default)")
    parser.add_argument("--latency-in-flight", type=int, default=50,
                        help="provider calls in flight for the 100 ms latency target")
    parser.add_argument("--dispatchers", type=int, default=1,
                        help="competing `dispatcher run` processes (CPU per job summed)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--callbacks", action="store_true",
                        help="let the sandbox POST status callbacks to the dispatcher")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--priority-only", action="store_true",
                        help="only the transactional probes behind a --backlog bulk backlog "
                             "(recorded as their own section)")
    parser.add_argument("--keep-logs", type=Path, default=None,
                        help="keep the dispatcher's log at this path")
    parser.add_argument("--py-spy", type=Path, default=None,
                        help="sample each dispatcher run with py-spy, stacks to this path")
    parser.add_argument("--profile", type=Path, default=None,
                        help="run the dispatcher under cProfile, stats to this path")
    parser.add_argument("--dsn", default=os.environ.get(
        "BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    run_loop(bench(args))


if __name__ == "__main__":
    main()
