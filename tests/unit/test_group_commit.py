"""GroupCommit: concurrent submits share round trips, results go back to their own callers."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.jobs.group_commit import GroupCommit


class Recorder:
    """A fake batch store: records each round trip; items equal to ``bad`` make a batch fail."""

    def __init__(self, bad: int | None = None, delay: float = 0.01) -> None:
        self.batches: list[list[int]] = []
        self.singles: list[int] = []
        self.bad = bad
        self.delay = delay

    async def run_batch(self, items: list[int]) -> list[int]:
        await asyncio.sleep(self.delay)
        if self.bad in items:
            raise RuntimeError("batch refused")
        self.batches.append(items)
        return [i * 10 for i in items]

    async def run_one(self, item: int) -> int:
        await asyncio.sleep(self.delay)
        if item == self.bad:
            raise ValueError(f"bad item {item}")
        self.singles.append(item)
        return item * 10


async def test_an_idle_submit_goes_out_alone_and_at_once() -> None:
    store = Recorder()
    commit = GroupCommit(store.run_batch, store.run_one, concurrency=1)
    assert await commit.submit(7) == 70
    assert store.singles == [7] and store.batches == []


async def test_submits_made_while_a_batch_is_in_flight_share_the_next_round_trip() -> None:
    store = Recorder()
    commit = GroupCommit(store.run_batch, store.run_one, max_batch=50, concurrency=1)
    first = asyncio.create_task(commit.submit(0))
    await asyncio.sleep(0.001)  # its round trip is in flight now
    results = await asyncio.gather(*(commit.submit(i) for i in range(1, 101)))
    assert await first == 0
    assert results == [i * 10 for i in range(1, 101)]
    # The first went alone; the other 100 waited for it and went in two full batches.
    assert store.singles == [0]
    assert store.batches == [list(range(1, 51)), list(range(51, 101))]
    assert commit.batches == 3


async def test_a_failing_batch_is_retried_one_by_one_so_only_the_bad_item_fails() -> None:
    store = Recorder(bad=3)
    commit = GroupCommit(store.run_batch, store.run_one, concurrency=1)
    outcomes = await asyncio.gather(*(commit.submit(i) for i in range(6)),
                                    return_exceptions=True)
    assert outcomes[3].__class__ is ValueError
    assert [o for i, o in enumerate(outcomes) if i != 3] == [0, 10, 20, 40, 50]
    assert sorted(store.singles) == [0, 1, 2, 4, 5]


async def test_concurrency_bounds_round_trips_in_flight() -> None:
    in_flight = peak = 0

    async def run_batch(items: list[int]) -> list[int]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return items

    async def run_one(item: int) -> int:
        return (await run_batch([item]))[0]

    commit = GroupCommit(run_batch, run_one, max_batch=5, concurrency=2)
    assert await asyncio.gather(*(commit.submit(i) for i in range(40))) == list(range(40))
    assert peak == 2


async def test_a_caller_that_gives_up_does_not_break_the_batch() -> None:
    store = Recorder(delay=0.05)
    commit = GroupCommit(store.run_batch, store.run_one, concurrency=1)
    first = asyncio.create_task(commit.submit(1))
    await asyncio.sleep(0)
    quitter = asyncio.create_task(commit.submit(2))
    stayer = asyncio.create_task(commit.submit(3))
    await asyncio.sleep(0.01)
    quitter.cancel()
    assert await first == 10
    assert await stayer == 30
    with pytest.raises(asyncio.CancelledError):
        await quitter


def test_sizes_must_be_positive() -> None:
    async def never(items: list[int]) -> list[int]:
        raise AssertionError

    async def never_one(item: int) -> int:
        raise AssertionError

    with pytest.raises(ValueError, match="positive"):
        GroupCommit(never, never_one, max_batch=0)



async def test_keyed_items_keep_their_order_and_never_share_concurrent_batches() -> None:
    running: list[set[str]] = []
    done: list[tuple[str, int]] = []

    async def run_batch(items: list[tuple[str, int]]) -> list[int]:
        keys = {key for key, _ in items}
        assert all(not keys & other for other in running), "a key in two batches at once"
        running.append(keys)
        await asyncio.sleep(0.002 * (1 + len(items) % 3))  # batches finish out of order
        done.extend(items)
        running.remove(keys)
        return [n for _, n in items]

    async def run_one(item: tuple[str, int]) -> int:
        [result] = await run_batch([item])
        return result

    commit: GroupCommit[tuple[str, int], int] = GroupCommit(
        run_batch, run_one, max_batch=7, concurrency=2, key=lambda item: item[0])
    queued: list[tuple[str, int]] = []

    async def submit(item: tuple[str, int]) -> int:
        await asyncio.sleep(0.0001 * (item[1] % 7))  # submits arrive while batches fly
        queued.append(item)
        return await commit.submit(item)
    items = [(f"account-{n % 3 if n % 5 else 0}", n) for n in range(200)]
    results = await asyncio.gather(*(submit(item) for item in items))
    assert sorted(results) == list(range(200))
    for key in {key for key, _ in items}:
        assert [n for k, n in done if k == key] == [n for k, n in queued if k == key]
    assert 1 < commit.batches < 200


async def test_rank_zero_items_go_in_the_next_batch_ahead_of_older_ones() -> None:
    store = Recorder()
    # Odd items are transactional (rank 0); even ones bulk.
    commit = GroupCommit(store.run_batch, store.run_one, max_batch=3, concurrency=1,
                         rank=lambda item: 0 if item % 2 else 1)
    first = asyncio.create_task(commit.submit(100))
    await asyncio.sleep(0.001)  # in flight: everything below waits for the next batches
    later = [asyncio.create_task(commit.submit(i)) for i in (2, 4, 6, 8, 1, 3, 10, 5)]
    results = await asyncio.gather(first, *later)
    assert results == [1000, 20, 40, 60, 80, 10, 30, 100, 50]
    # The three transactional items overtook four older bulk ones; each rank keeps its order.
    assert store.batches == [[1, 3, 5], [2, 4, 6], [8, 10]]


async def test_without_a_rank_batches_keep_submission_order() -> None:
    store = Recorder()
    commit = GroupCommit(store.run_batch, store.run_one, max_batch=3, concurrency=1)
    first = asyncio.create_task(commit.submit(100))
    await asyncio.sleep(0.001)
    await asyncio.gather(first, *(commit.submit(i) for i in (2, 4, 6, 8, 1, 3, 10, 5)))
    assert store.batches == [[2, 4, 6], [8, 1, 3], [10, 5]]


async def test_rank_zero_has_one_round_trip_of_its_own_while_the_others_are_busy() -> None:
    store = Recorder(delay=0.2)
    commit = GroupCommit(store.run_batch, store.run_one, max_batch=10, concurrency=1,
                         rank=lambda item: 0 if item % 2 else 1)
    bulk = asyncio.create_task(commit.submit(100))
    await asyncio.sleep(0.01)  # the only ordinary round trip is busy for 0.2 s
    more_bulk = asyncio.create_task(commit.submit(102))
    transactional = asyncio.create_task(commit.submit(7))
    assert await transactional == 70
    # It went beside the busy round trip; the later bulk item still waits for that one.
    assert not more_bulk.done()
    await asyncio.gather(bulk, more_bulk)
    assert sorted(store.singles[:2]) == [7, 100]
    assert store.singles[2] == 102


async def test_without_a_rank_there_is_no_extra_round_trip() -> None:
    store = Recorder(delay=0.05)
    in_flight = peak = 0

    async def counting(item: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await store.run_one(item)
        finally:
            in_flight -= 1

    commit = GroupCommit(store.run_batch, counting, max_batch=1, concurrency=1)
    await asyncio.gather(*(commit.submit(i) for i in range(5)))
    assert peak == 1
