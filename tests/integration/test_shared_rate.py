"""Three replicas' limiters, each on its own pool, share one sender rate through PostgreSQL:
the rate they reach together stays within 10 % of the limit, in batches of turns."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from dispatcher.dispatch.rate_slots import Pace, PostgresSlots
from dispatcher.dispatch.shared_rate import SharedSenderRateLimiter

RATE = 100.0
TURNS = 400  # per sender: the one-second burst, then three seconds at the rate
REPLICAS = 3


@pytest.fixture
async def pools(database_url: str) -> AsyncIterator[list[asyncpg.Pool]]:
    opened = [await asyncpg.create_pool(database_url, min_size=1, max_size=2)
              for _ in range(REPLICAS)]
    yield opened
    for pool in opened:
        await pool.close()


async def test_three_replicas_keep_one_sender_rate(pools: list[asyncpg.Pool]) -> None:
    replicas = [SharedSenderRateLimiter(PostgresSlots(pool), RATE) for pool in pools]
    granted: dict[str, list[float]] = {"+14155550101": [], "+14155550102": []}
    tickets = {sender: iter(range(TURNS)) for sender in granted}

    async def worker(limiter: SharedSenderRateLimiter, sender: str) -> None:
        for _ in tickets[sender]:
            await limiter.acquire(sender)
            granted[sender].append(time.monotonic())

    await asyncio.wait_for(asyncio.gather(*(
        worker(limiter, sender) for limiter in replicas for sender in granted
        for _ in range(10))), 30)
    for sender, times in granted.items():
        paced = sorted(times)[int(RATE):]  # after the burst
        rate = (len(paced) - 1) / (paced[-1] - paced[0])
        assert rate == pytest.approx(RATE, rel=0.1), sender
        # No second in the run beats the rate by more than the burst (1 s's worth) plus 10 %.
        assert max(sum(1 for t in times if start <= t < start + 1) for start in times) <= (
            RATE * 2.1)
    takes = sum(limiter.takes for limiter in replicas)
    assert takes < 2 * TURNS / 5, takes  # one round trip per batch, not per send


async def test_the_bucket_lives_in_the_database(pools: list[asyncpg.Pool]) -> None:
    pace = Pace.of(10, burst=1)
    first = await PostgresSlots(pools[0]).take("+14155550199", 2, pace)
    second = await PostgresSlots(pools[1]).take("+14155550199", 1, pace)
    assert first.delay(0) == 0.0
    assert first.delay(1) == pytest.approx(0.1, abs=0.01)
    # The other replica's take comes after both of the first's turns.
    assert second.delay(0) == pytest.approx(0.2, abs=0.05)
    tat = await pools[2].fetchval("SELECT tat FROM sender_rates WHERE sender = $1",
                                  "+14155550199")
    now = await pools[2].fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
    assert tat - now == pytest.approx(0.3, abs=0.05)
