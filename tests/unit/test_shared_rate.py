"""SharedSenderRateLimiter on an in-process bucket: the process limiter's rules (a burst, then
the rate; arrival order; a send no longer wanted gives its turn up), shared by several
limiters, with the bucket taken in batches and a failed take survived."""

from __future__ import annotations

import asyncio
import time

import pytest

from dispatcher.dispatch.rate_slots import Grant, MemorySlots, Pace
from dispatcher.dispatch.shared_rate import SharedSenderRateLimiter


async def test_a_burst_then_one_per_interval() -> None:
    slots = MemorySlots()
    bursty = SharedSenderRateLimiter(slots, 1, burst=5)
    for _ in range(5):
        assert await asyncio.wait_for(bursty.acquire("s"), 1)
    with pytest.raises(TimeoutError):  # the sixth waits a second
        await asyncio.wait_for(bursty.acquire("s"), 0.2)
    paced = SharedSenderRateLimiter(MemorySlots(), 20, burst=1)
    started = time.monotonic()
    for _ in range(6):
        await paced.acquire("s")
    assert time.monotonic() - started >= 5 / 20 - 0.01  # never faster than the rate


async def test_waiting_senders_go_in_arrival_order() -> None:
    paced = SharedSenderRateLimiter(MemorySlots(), 100, burst=1)
    await paced.acquire("s")
    order: list[int] = []

    async def send(number: int) -> None:
        await paced.acquire("s")
        order.append(number)

    tasks = []
    for number in range(8):
        tasks.append(asyncio.create_task(send(number)))
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == list(range(8))


async def test_a_send_no_longer_wanted_gives_its_turn_up() -> None:
    paced = SharedSenderRateLimiter(MemorySlots(), 2, burst=1)  # one turn every 0.5 s
    assert await paced.acquire("s")
    wanted = True
    giving_up = asyncio.create_task(paced.acquire("s", lambda: wanted))
    await asyncio.sleep(0.1)
    wanted = False
    started = time.monotonic()
    assert await asyncio.wait_for(giving_up, 1) is False
    assert time.monotonic() - started < 0.3
    assert await asyncio.wait_for(paced.acquire("s"), 1) is True  # the turn it left
    assert await paced.acquire("s", lambda: False) is False


async def test_three_limiters_on_one_bucket_keep_one_rate() -> None:
    slots = MemorySlots()
    replicas = [SharedSenderRateLimiter(slots, 200) for _ in range(3)]
    granted: list[float] = []

    async def worker(limiter: SharedSenderRateLimiter) -> None:
        for _ in range(20):
            await limiter.acquire("s")
            granted.append(time.monotonic())

    await asyncio.wait_for(asyncio.gather(*(worker(r) for r in replicas for _ in range(10))),
                           10)
    paced = sorted(granted)[200:]  # after the one-second burst
    rate = (len(paced) - 1) / (paced[-1] - paced[0])
    assert rate == pytest.approx(200, rel=0.1)
    assert sum(r.takes for r in replicas) < 600 / 5  # batches, not a take per send


async def test_a_quiet_sender_takes_in_growing_batches() -> None:
    slots = MemorySlots()
    limiter = SharedSenderRateLimiter(slots, 1e9)
    for _ in range(1000):
        await limiter.acquire("s")
    assert slots.takes <= 12  # 1, 1, 2, 4, ... within a lease


async def test_unused_turns_expire_after_keep_seconds() -> None:
    slots = MemorySlots()
    limiter = SharedSenderRateLimiter(slots, 1000, keep_seconds=0.05)
    for _ in range(8):
        await limiter.acquire("s")
    takes = slots.takes
    await asyncio.sleep(0.08)
    await limiter.acquire("s")
    assert slots.takes == takes + 1  # what was left over was dropped, not saved up


async def test_a_steady_quiet_sender_takes_about_once_per_keep_seconds() -> None:
    # 10 sends a second, far below the limit: the turns of one take last the next ones.
    slots = MemorySlots()
    limiter = SharedSenderRateLimiter(slots, 1e6, keep_seconds=0.5)
    for _ in range(15):
        await limiter.acquire("s")
        await asyncio.sleep(0.1)
    assert slots.takes <= 8  # not one per send (15)


async def test_a_batch_is_at_most_lease_seconds_of_the_rate() -> None:
    slots = MemorySlots()
    limiter = SharedSenderRateLimiter(slots, 100, burst=100, lease_seconds=0.1)
    await asyncio.gather(*(limiter.acquire("s") for _ in range(50)))
    assert slots.takes == 5  # 50 waiting sends, 10 turns a take


class FailingOnce(MemorySlots):
    """A bucket whose first take meets a database outage."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def take(self, sender: str, count: int, pace: Pace) -> Grant:
        if not self.failed:
            self.failed = True
            await asyncio.sleep(0.01)
            raise ConnectionRefusedError("database away")
        return await super().take(sender, count, pace)


async def test_a_failed_take_fails_the_waiting_sends_and_the_next_one_takes_again() -> None:
    limiter = SharedSenderRateLimiter(FailingOnce(), 100)
    waiting = [asyncio.create_task(limiter.acquire("s")) for _ in range(3)]
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, ConnectionRefusedError) for r in results)
    assert await asyncio.wait_for(limiter.acquire("s"), 1) is True


async def test_a_cancelled_wait_leaves_the_queue() -> None:
    limiter = SharedSenderRateLimiter(MemorySlots(), 2, burst=1)
    await limiter.acquire("s")
    waiting = asyncio.create_task(limiter.acquire("s"))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await asyncio.wait_for(limiter.acquire("s"), 1) is True
