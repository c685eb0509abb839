"""Three replicas' limiters, each on its own pool, share one sender rate through PostgreSQL:
the rate they reach together stays within 10 % of the limit, in batches of turns; two whole
dispatcher services on one queue send a sender no faster than its rate together."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from dispatcher.dispatch.rate_slots import Pace, PostgresSlots
from dispatcher.dispatch.shared_rate import SharedSenderRateLimiter
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import running_dispatcher, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

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
    started = time.monotonic()
    first = await PostgresSlots(pools[0]).take("+14155550199", 2, pace)
    second = await PostgresSlots(pools[1]).take("+14155550199", 1, pace)
    between = time.monotonic() - started
    assert first.delay(0) == 0.0
    assert first.delay(1) == pytest.approx(0.1, abs=0.01)
    # The other replica's take comes after both of the first's turns.
    assert 0.2 - between - 0.01 <= second.delay(0) <= 0.2 + 0.01
    tat = await pools[2].fetchval("SELECT tat FROM sender_rates WHERE sender = $1",
                                  "+14155550199")
    now = await pools[2].fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
    assert 0.3 - (time.monotonic() - started) - 0.01 <= tat - now <= 0.31


async def test_two_dispatcher_replicas_send_one_sender_at_its_rate_together(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    # Two services, each with its own pool, consuming the same queues (competing consumers).
    rate, jobs, sender = 5.0, 30, "+14155550198"
    async with contextlib.AsyncExitStack() as stack:
        replicas = [await stack.enter_async_context(running_dispatcher(
            settings, twilio_sandbox, pool, sender_rate_per_second=rate)) for _ in range(2)]
        account = await replicas[0].funded_account(f"acct-{uuid.uuid4().hex[:10]}", jobs)
        for i in range(jobs):
            await replicas[i % 2].publisher.publish({
                "schema_version": 1, "id": f"shared-{uuid.uuid4().hex[:10]}", "kind": "sms",
                "account": account, "from": sender, "to": f"+1415555{3000 + i}",
                "body": "shared"})

        async def all_sent() -> bool:
            return twilio_sandbox.state.count() >= jobs
        await wait_for(all_sent, timeout=30)
    times = sorted(r.received_at.timestamp() for r in twilio_sandbox.state.creates())
    # Turns are taken before a job's begin, whose group commit can release several sends at
    # once (a slow first batch most): the rate is read on the sends after the first ten.
    tail = times[10:]
    assert (len(tail) - 1) / (tail[-1] - tail[0]) <= rate * 1.15  # not twice the rate
    assert await pool.fetchval("SELECT count(*) FROM sender_rates WHERE sender = $1",
                               sender) == 1
