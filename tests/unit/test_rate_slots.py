"""The shared bucket's math (GCRA, one time per sender): a burst, then one turn per interval,
however the turns are taken — one at a time, in batches, or by several replicas in turn."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.dispatch.rate_slots import Grant, MemorySlots, Pace, grant_of, take


def _times(tat: float | None, now: float, count: int, pace: Pace) -> tuple[float, list[float]]:
    new_tat, grant = take(tat, now, count, pace)
    return new_tat, [now + grant.delay(i) for i in range(count)]


def test_pace_of_a_rate_and_its_burst() -> None:
    assert Pace.of(100) == Pace(0.01, pytest.approx(0.99))  # type: ignore[arg-type]
    assert Pace.of(0.5) == Pace(2.0, 0.0)  # burst of one below 1/s
    assert Pace.of(10, burst=1).tolerance == 0.0
    for bad in ({"per_second": 0}, {"per_second": 1, "burst": 0.5}):
        with pytest.raises(ValueError, match="must be"):
            Pace.of(**bad)  # type: ignore[arg-type]


def test_a_full_bucket_gives_the_burst_at_once_then_one_per_interval() -> None:
    pace = Pace.of(10, burst=5)
    tat, times = _times(None, 100.0, 8, pace)
    assert times[:5] == [100.0] * 5
    assert times[5:] == pytest.approx([100.1, 100.2, 100.3])
    assert tat == pytest.approx(100.8)
    # Right after, the next turn comes one interval after the last one.
    _, more = _times(tat, 100.0, 1, pace)
    assert more == pytest.approx([100.4])


def test_one_batch_equals_the_same_turns_taken_one_by_one() -> None:
    pace = Pace.of(50, burst=3)
    batch_tat, batch = _times(7.0, 6.5, 10, pace)
    tat: float | None = 7.0
    single: list[float] = []
    for _ in range(10):
        tat, times = _times(tat, 6.5, 1, pace)
        single += times
    assert batch_tat == pytest.approx(tat)
    assert batch == pytest.approx(single)


def test_an_idle_bucket_fills_up_to_its_burst_and_no_further() -> None:
    pace = Pace.of(10, burst=4)
    tat, _ = _times(None, 0.0, 4, pace)  # emptied
    _, half = _times(tat, 0.2, 4, pace)  # 0.2 s refilled two turns
    assert half == pytest.approx([0.2, 0.2, 0.3, 0.4])
    _, later = _times(tat, 60.0, 6, pace)  # a minute idle: still a burst of four
    assert later == pytest.approx([60.0] * 4 + [60.1, 60.2])


def test_what_the_database_returns_gives_the_same_turns() -> None:
    pace = Pace.of(20)
    new_tat, grant = take(12.0, 10.0, 3, pace)
    assert grant_of(new_tat, 10.0, 3, pace) == grant
    assert grant == Grant(pytest.approx(12.0 - pace.tolerance - 10.0), 3, 0.05)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        take(None, 0.0, 0, pace)


@given(takes=st.lists(st.tuples(st.floats(0, 0.3), st.integers(1, 12)), min_size=1,
                      max_size=60),
       rate=st.sampled_from([5.0, 100.0, 1000.0]), burst=st.sampled_from([1.0, 3.0, 20.0]))
def test_however_replicas_split_the_turns_no_window_exceeds_burst_plus_rate(
        takes: list[tuple[float, int]], rate: float, burst: float) -> None:
    # Replicas take batches of any size at any moments, one after another (the row lock
    # orders them): the turns granted never beat the rate beyond the one burst.
    pace = Pace.of(rate, burst)
    now, tat = 0.0, None
    turns: list[float] = []
    for gap, count in takes:
        now += gap
        tat, times = _times(tat, now, count, pace)
        turns += times
    turns.sort()
    for i, first in enumerate(turns):
        for j in range(i, len(turns)):
            window = turns[j] - first
            assert j - i + 1 <= burst + window * rate + 1e-6


async def test_memory_slots_keep_one_bucket_per_sender() -> None:
    now = [0.0]
    slots = MemorySlots(lambda: now[0])
    pace = Pace.of(10, burst=1)
    assert (await slots.take("a", 2, pace)).delay(1) == pytest.approx(0.1)
    assert (await slots.take("b", 1, pace)).delay(0) == 0.0  # b's bucket is its own
    now[0] = 0.05
    assert (await slots.take("a", 1, pace)).delay(0) == pytest.approx(0.15)
    assert slots.takes == 3
