"""SendSlots: the bound on provider calls in flight, transactional waiters first."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.dispatch.send_slots import SendSlots


async def test_never_more_than_the_limit_hold_a_slot() -> None:
    slots = SendSlots(3)
    holding = peak = 0

    async def call() -> None:
        nonlocal holding, peak
        async with slots.slot(1):
            holding += 1
            peak = max(peak, holding)
            await asyncio.sleep(0.001)
            holding -= 1

    await asyncio.gather(*(call() for _ in range(50)))
    assert peak == 3
    assert holding == 0


async def test_waiters_are_served_by_rank_then_arrival() -> None:
    slots = SendSlots(1)
    order: list[str] = []
    release = asyncio.Event()

    async def first() -> None:
        async with slots.slot(1):
            await release.wait()

    async def waiter(name: str, rank: int) -> None:
        async with slots.slot(rank):
            order.append(name)

    holder = asyncio.create_task(first())
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(waiter(name, rank)) for name, rank in
               [("bulk-1", 1), ("tx-1", 0), ("bulk-2", 1), ("tx-2", 0)]]
    await asyncio.sleep(0)
    assert slots.waiting == 4
    release.set()
    await asyncio.gather(holder, *waiters)
    assert order == ["tx-1", "tx-2", "bulk-1", "bulk-2"]


async def test_a_cancelled_waiter_gives_up_its_place_without_leaking_the_slot() -> None:
    slots = SendSlots(1)
    release = asyncio.Event()
    served: list[str] = []

    async def hold() -> None:
        async with slots.slot(0):
            await release.wait()

    async def wait_then_record(name: str) -> None:
        async with slots.slot(0):
            served.append(name)

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(wait_then_record("cancelled"))
    kept = asyncio.create_task(wait_then_record("kept"))
    await asyncio.sleep(0)
    cancelled.cancel()
    release.set()
    await asyncio.gather(holder, kept)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert served == ["kept"]
    # Every slot came back: one more caller gets one at once.
    async with asyncio.timeout(1):
        async with slots.slot(1):
            pass


async def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    slots = SendSlots(1)
    served: list[str] = []

    async def wait_then_record(name: str) -> None:
        async with slots.slot(0):
            served.append(name)

    async with slots.slot(0):
        unlucky = asyncio.create_task(wait_then_record("unlucky"))
        after = asyncio.create_task(wait_then_record("after"))
        await asyncio.sleep(0)
    # Leaving the block handed the slot to `unlucky`; it is cancelled before it runs.
    unlucky.cancel()
    async with asyncio.timeout(1):
        await after
    assert served == ["after"]


async def test_the_wait_is_reported() -> None:
    slots = SendSlots(1)
    async with slots.slot(0) as waited:
        assert waited < 0.05
        later = asyncio.create_task(_waited(slots))
        await asyncio.sleep(0.05)
    assert await later >= 0.04


async def _waited(slots: SendSlots, rank: int = 0) -> float:
    async with slots.slot(rank) as waited:
        return waited


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit must be positive"):
        SendSlots(0)

