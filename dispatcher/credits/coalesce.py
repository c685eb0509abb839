"""One ``reserve_batch`` in flight per account per pool: concurrent callers share the next one.

On one hot account every batch waits for the account's row lock anyway, so 32 sessions each
sending their own batch mostly queue on the server. Here, while an account's batch is in flight,
later callers for that account wait in this process; when it returns, all waiting callers (up to
``MAX_JOBS`` jobs) go as one batch in arrival order. Each caller gets exactly the rows that a
serial run of the callers in arrival order gives it:

* up to and including the first caller with an ``insufficient`` row, the shared batch *is* that
  serial run (``reserve_batch`` works in order; nothing crosses a caller boundary but job ids
  reserved earlier, which a serial run sees as well);
* after it nothing more is reserved, and a later caller's rows are still exact unless its first
  ``insufficient`` job would fit on its own (``reserve_batch`` stops at the first job that does
  not fit, a serial run starts each caller afresh): that caller and every one after it are sent
  again, first in the next batch. The first caller of a batch is always answered, so this ends;
* if the shared batch fails on a job id another account took meanwhile (a unique violation:
  one caller's problem), its callers are sent again one by one; any other failure is every
  caller's failure.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

# Jobs per shared batch: ~30 ms of server time here (bench/RESULTS.md); one caller's batch of any
# size still goes alone.
MAX_JOBS = 1000

Fetch = Callable[[str, list[str], list[int]], Awaitable[list[Any]]]


@dataclass
class _Call:
    ids: list[str]
    amounts: list[int]
    future: asyncio.Future[list[Any]]


@dataclass
class _Lane:
    """The callers waiting for one account's next batch, and the task sending batches."""

    fetch: Fetch
    max_jobs: int
    pending: deque[_Call] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


# Keyed by (id of the pool, account). A lane exists only while its task runs, and that task
# holds the pool (through ``fetch``), so the id cannot be reused meanwhile.
_lanes: dict[tuple[int, str], _Lane] = {}


async def reserve_coalesced(owner: object, account_id: str, ids: list[str], amounts: list[int],
                            fetch: Fetch, *, max_jobs: int = MAX_JOBS) -> list[Any]:
    """``fetch(account_id, ids, amounts)``'s rows for these jobs, sharing a batch with others."""
    key = (id(owner), account_id)
    lane = _lanes.get(key)
    if lane is None:
        lane = _lanes[key] = _Lane(fetch, max_jobs)
    call = _Call(ids, amounts, asyncio.get_running_loop().create_future())
    lane.pending.append(call)
    if lane.task is None:
        lane.task = asyncio.create_task(_drain(key, lane), name="reserve_batch_lane")
    return await call.future


async def _drain(key: tuple[int, str], lane: _Lane) -> None:
    try:
        while calls := _next_batch(lane):
            await _send(key[1], lane, calls)
    finally:
        # No await since the loop found the lane empty, so nobody joined it meanwhile.
        del _lanes[key]
        for call in lane.pending:  # only after a cancellation
            call.future.cancel()


def _next_batch(lane: _Lane) -> list[_Call]:
    """The oldest waiting callers, up to ``max_jobs`` jobs (at least one caller)."""
    calls: list[_Call] = []
    jobs = 0
    while lane.pending:
        call = lane.pending[0]
        if call.future.done():  # the caller was cancelled while waiting
            lane.pending.popleft()
            continue
        if calls and jobs + len(call.ids) > lane.max_jobs:
            break
        calls.append(lane.pending.popleft())
        jobs += len(call.ids)
    return calls


async def _send(account_id: str, lane: _Lane, calls: list[_Call]) -> None:
    try:
        rows = await lane.fetch(account_id, [i for c in calls for i in c.ids],
                                [a for c in calls for a in c.amounts])
    except asyncpg.UniqueViolationError as exc:
        if len(calls) == 1:
            _fail(calls[0], exc)
            return
        for call in calls:
            if not call.future.done():
                await _send(account_id, lane, [call])
        return
    except Exception as exc:
        for call in calls:
            _fail(call, exc)
        return
    except BaseException:
        for call in calls:
            call.future.cancel()
        raise
    lane.pending.extendleft(reversed(_answer(calls, rows)))


def _answer(calls: list[_Call], rows: Sequence[Any]) -> list[_Call]:
    """Give each caller its rows; return the callers whose rows are not exact, to send again."""
    offset = 0
    exhausted = False
    for n, call in enumerate(calls):
        mine = list(rows[offset:offset + len(call.ids)])
        offset += len(call.ids)
        if exhausted and _would_reserve_alone(mine):
            return calls[n:]
        if not call.future.done():
            call.future.set_result(mine)
        exhausted = exhausted or any(r["status"] == "insufficient" for r in mine)
    return []


def _would_reserve_alone(rows: list[Any]) -> bool:
    """After the batch ran dry: would this caller's first refused job fit in a batch of its own?"""
    first = next((r for r in rows if r["status"] == "insufficient"), None)
    return first is not None and first["amount"] <= first["available"]


def _fail(call: _Call, exc: Exception) -> None:
    if not call.future.done():
        call.future.set_exception(exc)
