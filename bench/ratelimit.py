"""The per-sender rate limiters: the process one (aiolimiter), the hand-written token bucket
it replaced, and the one shared by replicas through PostgreSQL (``shared_rate``).

``python -m bench.ratelimit [--rounds 5] [--dsn postgresql://...]``: prints figures, records
nothing. All run in the same process, alternately, each round:

- hot path: CPU per ``acquire`` when the limit never binds (the benchmarks' and a quiet
  sender's case: 200,000 acquisitions at 1e9/s over 100 senders); for the shared limiter also
  its round trips to PostgreSQL per acquire and the wall time per acquire;
- pacing: 40 tasks share one sender at 200/s with a burst of 200 and take 600 turns: achieved
  rate after the burst (should be 200/s) and how often a turn went out of arrival order. The
  shared limiter runs as three replicas (three limiters, each on its own pool, 40 tasks spread
  over them), so its rate is the three together and its order is only kept within a replica.

The shared limiter needs PostgreSQL: a throw-away database ``dispatcher_bench_rl_<random>`` is
created on ``--dsn``'s server, migrated and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from dispatcher.dispatch.rate_slots import PostgresSlots
from dispatcher.dispatch.ratelimit import SenderRateLimiter
from dispatcher.dispatch.shared_rate import SharedSenderRateLimiter
from dispatcher.migrate import migrate

REPLICAS = 3


class HandWrittenBucket:
    """The token bucket this project had (dispatcher/dispatch/ratelimit.py until issue 14)."""

    def __init__(self, per_second: float, burst: float | None = None) -> None:
        self._rate = per_second
        self._burst = burst if burst is not None else max(1.0, per_second)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, sender: str) -> None:
        while True:
            async with self._lock:
                now = time.monotonic()
                tokens, updated = self._buckets.get(sender, (self._burst, now))
                tokens = min(self._burst, tokens + (now - updated) * self._rate)
                if tokens >= 1.0 - 1e-9:
                    self._buckets[sender] = (max(tokens - 1.0, 0.0), now)
                    return
                self._buckets[sender] = (tokens, now)
                wait = (1.0 - tokens) / self._rate
            await asyncio.sleep(wait)


Acquire = Callable[[str], Awaitable[None]]


async def hot_path(acquire: Acquire, count: int = 200_000) -> float:
    """Microseconds of CPU per acquire when nothing waits."""
    senders = [f"+1415555{i:04d}" for i in range(100)]
    started = time.process_time()
    for i in range(count):
        await acquire(senders[i % 100])
    return (time.process_time() - started) / count * 1e6


async def pacing(acquires: list[Acquire], rate: float = 200.0, turns: int = 600,
                 tasks: int = 40) -> tuple[float, int]:
    """(turns per second after the burst, turns granted out of arrival order); task ``k``
    acquires through ``acquires[k % len(acquires)]`` (one per replica)."""
    arrivals: list[int] = []
    granted: list[tuple[float, int]] = []
    ticket = iter(range(turns))

    async def worker(acquire: Acquire) -> None:
        for number in ticket:
            arrivals.append(number)
            await acquire("+14155550199")
            granted.append((time.monotonic(), number))

    await asyncio.gather(*(worker(acquires[k % len(acquires)]) for k in range(tasks)))
    granted.sort()
    paced = [at for at, _ in granted[int(rate):]]
    achieved = (len(paced) - 1) / (paced[-1] - paced[0])
    order = [number for _, number in granted]
    return achieved, sum(1 for a, b in itertools.pairwise(order) if b < a)


@asynccontextmanager
async def bench_database(admin_dsn: str) -> AsyncIterator[str]:
    """A migrated throw-away database's DSN, dropped afterwards."""
    name = f"dispatcher_bench_rl_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(admin_dsn)
        dsn = urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def shared_round(dsn: str) -> tuple[float, float, float, float, int, float]:
    """(hot-path µs CPU/acquire, µs wall/acquire, round trips/acquire, paced rate,
    out-of-order turns, round trips/turn while paced) for three replicas' shared limiters."""
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=4) for _ in range(REPLICAS)]
    try:
        await pools[0].execute("TRUNCATE sender_rates")
        hot = SharedSenderRateLimiter(PostgresSlots(pools[0]), 1e9)
        wall = time.perf_counter()
        cpu = await hot_path(hot.acquire)
        wall_us = (time.perf_counter() - wall) / 200_000 * 1e6
        hot_trips = hot.takes / 200_000
        replicas = [SharedSenderRateLimiter(PostgresSlots(pool), 200.0) for pool in pools]
        rate, disorder = await pacing([r.acquire for r in replicas])
        trips = sum(r.takes for r in replicas) / 600
        return cpu, wall_us, hot_trips, rate, disorder, trips
    finally:
        for pool in pools:
            await pool.close()


async def main(rounds: int, admin_dsn: str) -> None:
    results: dict[str, list[tuple[float, float, int]]] = {"aiolimiter": [], "hand-written": []}
    shared: list[tuple[float, float, float, float, int, float]] = []
    async with bench_database(admin_dsn) as dsn:
        for _ in range(rounds):
            for name, make in (("aiolimiter", SenderRateLimiter),
                               ("hand-written", HandWrittenBucket)):
                cpu = await hot_path(make(1e9).acquire)
                rate, disorder = await pacing([make(200.0).acquire])
                results[name].append((cpu, rate, disorder))
            shared.append(await shared_round(dsn))
    for name, runs in results.items():
        print(f"{name:13} hot path {statistics.median(r[0] for r in runs):5.2f} µs CPU/acquire"
              f" ({', '.join(f'{r[0]:.2f}' for r in runs)}); paced "
              f"{statistics.median(r[1] for r in runs):6.1f}/s of 200 "
              f"({', '.join(f'{r[1]:.1f}' for r in runs)}); out-of-order turns "
              f"{', '.join(str(r[2]) for r in runs)}")
    print(f"{'shared (pg)':13} hot path {statistics.median(r[0] for r in shared):5.2f} µs "
          f"CPU/acquire ({', '.join(f'{r[0]:.2f}' for r in shared)}), "
          f"{statistics.median(r[1] for r in shared):.2f} µs wall, "
          f"{statistics.median(r[2] for r in shared):.5f} round trips/acquire; "
          f"{REPLICAS} replicas paced {statistics.median(r[3] for r in shared):6.1f}/s of 200 "
          f"({', '.join(f'{r[3]:.1f}' for r in shared)}), "
          f"{statistics.median(r[5] for r in shared):.3f} round trips/turn; out-of-order "
          f"turns {', '.join(str(r[4]) for r in shared)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dsn", default=os.environ.get(
        "DISPATCHER_BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a server where a throw-away database may be created")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.dsn))
