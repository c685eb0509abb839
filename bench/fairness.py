"""Fair share: a small account's jobs behind a big account's backlog in the same lane (issue 16).

Run as ``python -m bench.fairness [--jobs 100000] [--small 10] [--runs 1] [--window 10]
[--latency-ms 0] [--baseline] [--record]``.

Everything is real and in its own process, as in ``bench.pipeline`` (whose environment this
reuses): ``python -m dispatcher run``, the Twilio sandbox, RabbitMQ and PostgreSQL. One
dispatcher runs throughout. Each round, account A publishes ``--jobs`` bulk SMS jobs (single
jobs over AMQP, confirmed, as fast as the publisher goes) while the dispatcher runs; in a
"with B" round, ``--gap`` seconds after A's last confirm, account B publishes ``--small`` bulk
jobs, one after the other. Measured:

- B's time to send: each job's ``sent_at`` (its row) minus the moment its publish began;
- A's throughput, solo and with B, rounds alternating (solo first) within the one run: with
  ``--window W`` (the default, 10 s) A's jobs sent in the W seconds from the moment B publishes
  (``--gap`` after A's last confirm; the same moment in a solo round), divided by W, so a 100k
  backlog need not be sent to the end: each round then has a dispatcher of its own, stopped
  afterwards, and A's leftovers are purged from the queue and ``staged_jobs``. With
  ``--window 0``, every job of A is sent: A's jobs / (A's last ``sent_at`` - A's first begin);
- where A's backlog was when B published: still in RabbitMQ, or staged in PostgreSQL.

``--baseline`` adds one "with B" round on a second dispatcher with ``DISPATCHER_FAIR_STAGING=0``
(fairness between accounts in the process only): B then waits behind A's queued backlog.
``--record`` replaces this benchmark's section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.request import urlopen

import asyncpg

from bench import pipeline_report as report
from bench.ledger_reserve import run_loop
from bench.pipeline import Bench, environment
from bench.pipeline_jobs import (
    make_batch,
    message,
    publish,
    queue_depth,
    sent_count,
    sent_times,
    span,
)
from bench.pipeline_procs import Dispatcher
from dispatcher.settings import Settings

SECTION = "## Fair share: a small account behind a 100k backlog (issue 16, `bench/fairness.py`)"
STALL_SECONDS = 60.0


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Round:
    """One round's figures."""

    name: str
    a_rate: float
    b_latencies: list[float] = field(default_factory=list)
    queued_at_b: int = 0
    staged_at_b: int = 0
    publish_seconds: float = 0.0


async def staged(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM staged_jobs"))


async def one_round(b: Bench, dispatcher: Dispatcher, name: str, with_b: bool) -> Round:
    """A's backlog (and B's few jobs), until B's jobs are sent and A's window is over (or,
    without a window, every job of A is sent)."""
    big, small = b.accounts[0], b.accounts[1]
    tag = b.tag("a")
    batch = make_batch(tag, b.args.jobs, [big])
    watch = asyncio.create_task(watch_backlog(b, dispatcher, tag)) if b.args.watch else None
    seconds = await publish(b.channel, b.names, batch)
    result = Round(name, 0.0, publish_seconds=seconds)
    log(f"  {name}: A published {batch.size:,} in {seconds:.1f}s")
    await asyncio.sleep(b.args.gap)
    window_start = time.time()
    if with_b:
        result.queued_at_b = await queue_depth(b.depth_channel, b.names.work_queue("bulk"))
        result.staged_at_b = await staged(b.pool)
        small_batch = make_batch(b.tag("b"), b.args.small, [small])
        published: dict[str, float] = {}
        exchange = await b.channel.get_exchange(b.names.jobs_exchange)
        for job_id, body in small_batch.bodies:
            published[job_id] = time.time()
            await exchange.publish(message(job_id, body), routing_key="sms.bulk", timeout=30)
        await wait_sent(b, small_batch.tag, small_batch.size, dispatcher)
        times = await sent_times(b.pool, list(published))
        result.b_latencies = sorted(times[j] - published[j] for j in published)
        log(f"  {name}: B p50 {pct(result.b_latencies, 50):.3f}s p99 "
            f"{pct(result.b_latencies, 99):.3f}s (A queued {result.queued_at_b:,}, "
            f"staged {result.staged_at_b:,} when B published)")
    if b.args.window > 0:
        await asyncio.sleep(max(0.0, window_start + b.args.window - time.time()))
        sent = int(await b.pool.fetchval(
            "SELECT count(*) FROM jobs WHERE job_id LIKE $1 AND sent_at >= to_timestamp($2)"
            " AND sent_at < to_timestamp($3)", tag + "-%", window_start,
            window_start + b.args.window))
        result.a_rate = sent / b.args.window
    else:
        await wait_sent(b, tag, batch.size, dispatcher)
        result.a_rate = (await span(b.pool, tag)).rate
    if watch is not None:
        watch.cancel()
    log(f"  {name}: A {result.a_rate:.0f} jobs/s")
    return result


async def clear_backlog(b: Bench) -> None:
    """A's leftovers after a windowed round (its dispatcher stopped): out of the queue and
    of ``staged_jobs``, so the next round starts empty."""
    channel = await b.channel.get_underlay_channel()
    purged = await channel.queue_purge(b.names.work_queue("bulk"))
    deleted = await b.pool.execute("DELETE FROM staged_jobs")
    log(f"  cleared: {int(purged.message_count or 0):,} queued, {deleted.split()[-1]} staged")


async def watch_backlog(b: Bench, dispatcher: Dispatcher, tag: str) -> None:
    """Log, every second, where A's backlog is (``--watch``)."""
    while True:
        text = await asyncio.to_thread(metrics_text, dispatcher)
        staged_total = next((line.split()[-1] for line in text.splitlines()
                             if line.startswith("dispatcher_jobs_staged_total")), "?")
        log(f"    queued {await queue_depth(b.depth_channel, b.names.work_queue('bulk')):,} "
            f"staged now {await staged(b.pool):,} staged total {staged_total} "
            f"sent {await sent_count(b.pool, tag):,}")
        await asyncio.sleep(1.0)


def metrics_text(dispatcher: Dispatcher) -> str:
    with urlopen(f"{dispatcher.settings.public_base_url}/metrics", timeout=10) as response:
        return str(response.read().decode())


async def wait_sent(b: Bench, tag: str, size: int, dispatcher: Dispatcher) -> None:
    last, progress = -1, time.monotonic()
    while True:
        if await sent_count(b.pool, tag) >= size:
            return
        # Progress of anything: B's jobs may wait long behind A's (the baseline round).
        count = int(await b.pool.fetchval(
            "SELECT count(*) FROM jobs WHERE sent_at IS NOT NULL"))
        now = time.monotonic()
        if count != last:
            last, progress = count, now
        elif now - progress > STALL_SECONDS:
            raise RuntimeError(f"{tag}: stalled at {count:,} sent")
        assert dispatcher.child is not None
        assert dispatcher.child.proc is not None
        if dispatcher.child.proc.poll() is not None:
            raise RuntimeError("the dispatcher exited")
        await asyncio.sleep(0.1)


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of sorted ``values``."""
    if not values:
        return float("nan")
    rank = max(0, min(len(values) - 1, round(p / 100 * len(values) + 0.5) - 1))
    return sorted(values)[rank]


async def run(args: argparse.Namespace) -> list[Round]:
    rounds: list[Round] = []
    async with environment(args) as b:
        b.sandbox.configure(report.scenario(args.latency_ms, args.callbacks))
        b.settings = replace(b.settings, fair_share=args.share)
        plan = [("A solo", False), ("A with B", True)] * args.runs
        if args.window > 0:  # a dispatcher per round: A's leftovers go with it
            for i, (name, with_b) in enumerate(plan):
                rounds.append(await windowed_round(b, Dispatcher(
                    b.settings, b.logs / f"dispatcher-{i}.log"), name, with_b))
        else:
            dispatcher = Dispatcher(b.settings, b.logs / "dispatcher.log")
            await asyncio.to_thread(dispatcher.start)
            try:
                for name, with_b in plan:
                    rounds.append(await one_round(b, dispatcher, name, with_b))
            finally:
                await asyncio.to_thread(dispatcher.stop)
        if args.baseline:
            plain = Dispatcher(replace(b.settings, fair_staging=0), b.logs / "plain.log")
            rounds.append(await windowed_round(b, plain, "no staging, A with B", True))
    return rounds


async def windowed_round(b: Bench, dispatcher: Dispatcher, name: str, with_b: bool) -> Round:
    """One round on a dispatcher of its own; A's leftovers cleared after it."""
    await asyncio.to_thread(dispatcher.start)
    try:
        return await one_round(b, dispatcher, name, with_b)
    finally:
        await asyncio.to_thread(dispatcher.stop)
        if b.args.window > 0:
            await clear_backlog(b)


def section(rounds: list[Round], args: argparse.Namespace) -> str:
    solo = [r.a_rate for r in rounds if r.name == "A solo"]
    with_b = [r for r in rounds if r.name == "A with B"]
    latencies = sorted(x for r in with_b for x in r.b_latencies)
    ratio = statistics.median(r.a_rate for r in with_b) / statistics.median(solo)
    lines = [
        SECTION, "",
        f"`python -m bench.fairness --jobs {args.jobs} --small {args.small} --runs {args.runs} "
        f"--window {args.window:g} --latency-ms {args.latency_ms} --share {args.share}"
        f"{' --baseline' if args.baseline else ''}`, on "
        f"{time.strftime('%Y-%m-%d')}; one dispatcher (defaults: prefetch {args.prefetch}, "
        f"{args.in_flight} in flight), sandbox at {args.latency_ms} ms. The machine is shared "
        f"(2 cores, other work running): figures move with its load.", "",
        "| round | A published in | A queued / staged when B published | B p50 | B p99 | "
        "A jobs/s |",
        "|---|---|---|---|---|---|"]
    for r in rounds:
        b50 = f"{pct(r.b_latencies, 50):.3f} s" if r.b_latencies else "—"
        b99 = f"{pct(r.b_latencies, 99):.3f} s" if r.b_latencies else "—"
        where = f"{r.queued_at_b:,} / {r.staged_at_b:,}" if r.b_latencies else "—"
        lines.append(f"| {r.name} | {r.publish_seconds:.1f} s | {where} | {b50} | {b99} | "
                     f"{r.a_rate:.0f} |")
    lines += ["", f"B over every \"with B\" round: p50 {pct(latencies, 50):.3f} s, p99 "
              f"{pct(latencies, 99):.3f} s (target ≤ 1 s); A with B / A solo (medians): "
              f"{ratio:.2f} (target ≥ 0.9).", ""]
    return "\n".join(lines)


def record(text: str) -> None:
    results = Path(report.RESULTS)
    current = results.read_text(encoding="utf-8")
    start = current.find(SECTION + "\n")
    if start < 0:
        results.write_text(current.rstrip() + "\n\n" + text, encoding="utf-8")
        return
    rest = current[start + len(SECTION):]
    nxt = re.search(r"^## ", rest, re.MULTILINE)
    end = start + len(SECTION) + nxt.start() if nxt else len(current)
    results.write_text(current[:start] + text + ("\n" + current[end:] if end < len(current)
                                                 else ""), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=100_000, help="account A's backlog")
    parser.add_argument("--small", type=int, default=10, help="account B's jobs")
    parser.add_argument("--gap", type=float, default=0.5,
                        help="seconds between A's last confirm and B's first publish")
    parser.add_argument("--runs", type=int, default=1, help="solo + with-B round pairs")
    parser.add_argument("--window", type=float, default=10.0,
                        help="seconds from B's publish over which A's rate is measured "
                             "(0: send all of A's backlog, one dispatcher for every round)")
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--baseline", action="store_true",
                        help="one more with-B round on a dispatcher without staging")
    parser.add_argument("--prefetch", type=int, default=Settings().prefetch)
    parser.add_argument("--in-flight", type=int, default=Settings().max_in_flight)
    parser.add_argument("--workers", type=int, default=Settings().workers)
    parser.add_argument("--share", type=int, default=Settings().fair_share,
                        help="DISPATCHER_FAIR_SHARE (0: the worker count)")
    parser.add_argument("--callbacks", action="store_true")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--dsn", default=os.environ.get(
        "BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--watch", action="store_true", help="log the backlog every second")
    parser.add_argument("--keep-logs", type=Path, default=None,
                        help="keep the dispatcher's log at this path")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    # What bench.pipeline's environment reads.
    args.accounts = 2
    rounds = run_loop(run(args))
    text = section(rounds, args)
    print(text)
    if args.record:
        record(text)
        log(f"recorded in {report.RESULTS}")


if __name__ == "__main__":
    main()
