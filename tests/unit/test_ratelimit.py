"""SenderRateLimiter: a burst, then one send per 1/rate seconds, each sender on its own."""

from __future__ import annotations

import itertools

import pytest

from dispatcher.dispatch.ratelimit import SenderRateLimiter


class FakeClock:
    """monotonic() and asyncio.sleep() for the limiter, without waiting."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def limiter(clock: FakeClock, per_second: float, burst: float | None = None
            ) -> SenderRateLimiter:
    return SenderRateLimiter(per_second, burst, clock=clock.monotonic, sleep=clock.sleep)


async def test_a_burst_then_one_per_interval(clock: FakeClock) -> None:
    paced = limiter(clock, 5)
    times = []
    for _ in range(15):
        await paced.acquire("+14155550199")
        times.append(clock.now)
    assert times[:5] == [100.0] * 5
    gaps = [b - a for a, b in itertools.pairwise(times[4:])]
    assert all(gap == pytest.approx(0.2) for gap in gaps)
    assert times[-1] - times[0] == pytest.approx(2.0)


async def test_senders_do_not_share_a_bucket(clock: FakeClock) -> None:
    paced = limiter(clock, 1)
    await paced.acquire("+14155550001")
    await paced.acquire("+14155550002")
    assert clock.slept == []
    await paced.acquire("+14155550001")
    assert sum(clock.slept) == pytest.approx(1.0)


async def test_tokens_refill_while_idle_up_to_the_burst(clock: FakeClock) -> None:
    paced = limiter(clock, 2, burst=3)
    for _ in range(3):
        await paced.acquire("s")
    clock.now += 60  # a long pause refills to the burst, not beyond
    for _ in range(3):
        await paced.acquire("s")
    assert clock.slept == []
    await paced.acquire("s")
    assert sum(clock.slept) == pytest.approx(0.5)


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        SenderRateLimiter(per_second=0)


async def test_a_send_no_longer_wanted_gives_its_turn_up(clock: FakeClock) -> None:
    paced = limiter(clock, 1)
    assert await paced.acquire("s")
    wanted = [True, False]  # still wanted when it starts waiting, given up after one sleep
    assert await paced.acquire("s", lambda: wanted.pop(0)) is False
    assert clock.slept == [pytest.approx(1.0)]
    assert await paced.acquire("s")  # the token it did not take is the next one's
    assert clock.slept == [pytest.approx(1.0)]
