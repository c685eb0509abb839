"""The per-sender rate limiter: aiolimiter against the hand-written token bucket it replaced.

``python -m bench.ratelimit [--rounds 5]``: prints figures, records nothing. Both run in the
same process, alternately, each round:

- hot path: CPU per ``acquire`` when the limit never binds (the benchmarks' and a quiet
  sender's case: 200,000 acquisitions at 1e9/s over 100 senders);
- pacing: 40 tasks share one sender at 200/s with a burst of 200 and take 600 turns: achieved
  rate after the burst (should be 200/s) and how often a turn went out of arrival order.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable

from dispatcher.dispatch.ratelimit import SenderRateLimiter


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


async def pacing(acquire: Acquire, rate: float = 200.0, turns: int = 600,
                 tasks: int = 40) -> tuple[float, int]:
    """(turns per second after the burst, turns granted out of arrival order)."""
    arrivals: list[int] = []
    granted: list[tuple[float, int]] = []
    ticket = iter(range(turns))

    async def worker() -> None:
        for number in ticket:
            arrivals.append(number)
            await acquire("+14155550199")
            granted.append((time.monotonic(), number))

    await asyncio.gather(*(worker() for _ in range(tasks)))
    paced = [at for at, _ in granted[int(rate):]]
    achieved = (len(paced) - 1) / (paced[-1] - paced[0])
    order = [number for _, number in granted]
    return achieved, sum(1 for a, b in itertools.pairwise(order) if b < a)


async def main(rounds: int) -> None:
    results: dict[str, list[tuple[float, float, int]]] = {"aiolimiter": [], "hand-written": []}
    for _ in range(rounds):
        for name, make in (("aiolimiter", SenderRateLimiter), ("hand-written", HandWrittenBucket)):
            cpu = await hot_path(make(1e9).acquire)
            rate, disorder = await pacing(make(200.0).acquire)
            results[name].append((cpu, rate, disorder))
    for name, runs in results.items():
        print(f"{name:13} hot path {statistics.median(r[0] for r in runs):5.2f} µs CPU/acquire"
              f" ({', '.join(f'{r[0]:.2f}' for r in runs)}); paced "
              f"{statistics.median(r[1] for r in runs):6.1f}/s of 200 "
              f"({', '.join(f'{r[1]:.1f}' for r in runs)}); out-of-order turns "
              f"{', '.join(str(r[2]) for r in runs)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args().rounds))
