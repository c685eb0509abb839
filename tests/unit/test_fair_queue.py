"""The fair run queue: transactional first, accounts in turn by weight, order kept per account."""

from __future__ import annotations

import asyncio

from dispatcher.dispatch.fair_queue import FairQueue


def drain(queue: FairQueue[str]) -> list[str]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait()[2])
    return out


def test_accounts_take_turns_and_keep_their_own_order() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(5):
        queue.put_nowait(1, "a", f"a{i}")
    queue.put_nowait(1, "b", "b0")
    queue.put_nowait(1, "b", "b1")
    assert drain(queue) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4"]


def test_a_late_account_is_served_within_one_round() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(1000):
        queue.put_nowait(1, "big", f"big{i}")
    assert queue.get_nowait()[2] == "big0"
    queue.put_nowait(1, "small", "small0")
    assert [queue.get_nowait()[2] for _ in range(2)] == ["big1", "small0"]


def test_weights_give_that_many_jobs_per_turn() -> None:
    queue: FairQueue[str] = FairQueue(weight=lambda account: 3 if account == "gold" else 1)
    for i in range(6):
        queue.put_nowait(1, "gold", f"g{i}")
        queue.put_nowait(1, "free", f"f{i}")
    assert drain(queue)[:8] == ["g0", "g1", "g2", "f0", "g3", "g4", "g5", "f1"]


def test_the_transactional_lane_always_goes_first() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.put_nowait(1, "a", "bulk")
    queue.put_nowait(0, "b", "tx")
    assert queue.waiting(1, "a") == 1
    assert drain(queue) == ["tx", "bulk"]


async def test_get_waits_for_an_item() -> None:
    queue: FairQueue[str] = FairQueue()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    queue.put_nowait(1, "a", "x")
    assert await asyncio.wait_for(getter, 1) == (1, "a", "x")
