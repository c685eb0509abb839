"""SenderRateLimiter (aiolimiter's leaky bucket per sender): a burst, then one send per 1/rate
seconds, each sender on its own, waiting senders served in arrival order."""

from __future__ import annotations

import asyncio
import time

import pytest

from dispatcher.dispatch.ratelimit import SenderRateLimiter


async def test_a_burst_then_one_per_interval() -> None:
    # The default burst is one second's worth; a slow rate keeps a loaded machine from
    # refilling the bucket while the burst is taken.
    bursty = SenderRateLimiter(1, burst=5)
    for _ in range(5):
        await asyncio.wait_for(bursty.acquire("+14155550199"), 1)
    assert not bursty.limiter_for("+14155550199").has_capacity()
    paced = SenderRateLimiter(20, burst=1)
    started = time.monotonic()
    for _ in range(6):
        await paced.acquire("+14155550199")
    assert time.monotonic() - started >= 5 / 20 - 0.01  # never faster than the rate
    assert SenderRateLimiter(20).limiter_for("s").max_rate == 20


async def test_senders_do_not_share_a_bucket() -> None:
    paced = SenderRateLimiter(1)
    await paced.acquire("+14155550001")
    assert not paced.limiter_for("+14155550001").has_capacity()
    assert paced.limiter_for("+14155550002").has_capacity()
    await asyncio.wait_for(paced.acquire("+14155550002"), 1)


async def test_an_explicit_burst_and_a_rate_below_one_per_second() -> None:
    paced = SenderRateLimiter(0.5)  # burst of one, then one every 2 s
    await paced.acquire("s")
    assert not paced.limiter_for("s").has_capacity()
    bursty = SenderRateLimiter(0.5, burst=3)
    for _ in range(3):
        await asyncio.wait_for(bursty.acquire("s"), 1)
    assert not bursty.limiter_for("s").has_capacity()


async def test_waiting_senders_go_in_arrival_order() -> None:
    paced = SenderRateLimiter(100, burst=1)
    await paced.acquire("s")
    order: list[int] = []

    async def send(number: int) -> None:
        await paced.acquire("s")
        order.append(number)

    tasks = []
    for number in range(8):
        tasks.append(asyncio.create_task(send(number)))
        await asyncio.sleep(0)  # each one is waiting before the next arrives
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == list(range(8))


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        SenderRateLimiter(per_second=0)


async def test_a_send_no_longer_wanted_gives_its_turn_up() -> None:
    paced = SenderRateLimiter(2, burst=1)  # one turn every 0.5 s
    assert await paced.acquire("s")
    wanted = True
    giving_up = asyncio.create_task(paced.acquire("s", lambda: wanted))
    await asyncio.sleep(0.1)
    wanted = False
    started = time.monotonic()
    assert await asyncio.wait_for(giving_up, 1) is False
    assert time.monotonic() - started < 0.3  # it left the queue without waiting for a turn
    next_one = asyncio.create_task(paced.acquire("s"))
    assert await asyncio.wait_for(next_one, 1) is True  # the turn it left is the next one's
    assert await paced.acquire("s", lambda: False) is False  # never wanted: no turn taken
