"""Group commit: concurrent callers share one database round trip.

The first call while nothing is in flight goes out at once (no added latency when idle); calls
made while a batch is in flight wait for it and go together in the next one. A batch that fails
is retried one item at a time, so one bad item fails alone and never takes its neighbours with it.

With a ``key``, items of one key keep their submission order across batches too: an item never
goes out while a batch holding an earlier item of its key is in flight (with ``concurrency`` > 1
two batches could otherwise reach the database in either order); it waits for the next batch.

With a ``rank``, waiting items of rank 0 go out first, in a batch of their own (a small batch
is a quick round trip), and one extra round trip beyond ``concurrency`` may carry them while
the ordinary ones are all busy: a transactional job never waits behind a queue of bulk ones.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

import structlog

T = TypeVar("T")
R = TypeVar("R")
log = structlog.get_logger(__name__)


class GroupCommit(Generic[T, R]):
    """Runs ``run_batch`` over everything submitted meanwhile; results go back in order."""

    def __init__(self, run_batch: Callable[[list[T]], Awaitable[list[R]]],
                 run_one: Callable[[T], Awaitable[R]], *, max_batch: int = 200,
                 concurrency: int = 2, key: Callable[[T], Hashable] | None = None,
                 rank: Callable[[T], int] | None = None) -> None:
        if max_batch < 1 or concurrency < 1:
            raise ValueError("max_batch and concurrency must be positive")
        self._run_batch = run_batch
        self._run_one = run_one
        self._max_batch = max_batch
        self._concurrency = concurrency
        self._key = key
        self._rank = rank
        self._first_rank_waiting = 0
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._in_flight_keys: Counter[Hashable] = Counter()
        self._flushing = 0
        self._spare_flushing = False  # the extra round trip, for rank 0 only
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # how many round trips were made (for tests and metrics)

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch and wait for its own result."""
        return await self.enqueue(item)

    def enqueue(self, item: T) -> asyncio.Future[R]:
        """Queue ``item`` now (its place in the order is taken); its result comes in the future."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._rank is not None and self._rank(item) == 0:
            self._first_rank_waiting += 1
        if self._flushing < self._concurrency:
            self._flushing += 1
            self._start(self._flush())
        elif (not self._spare_flushing and self._rank is not None
              and self._rank(item) == 0):
            self._spare_flushing = True
            self._start(self._flush_first_rank())
        return future

    def _start(self, flush: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(flush, name="group-commit")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_first_rank(self) -> None:
        try:
            await self._flush_batches(first_rank_only=True)
        finally:
            self._spare_flushing = False

    async def _flush(self) -> None:
        try:
            await self._flush_batches(first_rank_only=False)
        finally:
            self._flushing -= 1

    async def _flush_batches(self, *, first_rank_only: bool) -> None:
        while batch := self._take(first_rank_only):
            keys = [self._key(item) for item, _ in batch] if self._key is not None else []
            self._in_flight_keys.update(keys)
            try:
                await self._run(batch)
            finally:
                self._in_flight_keys.subtract(keys)
                self._in_flight_keys += Counter()  # drop the keys that reached zero

    def _take(self, first_rank_only: bool) -> list[tuple[T, asyncio.Future[R]]]:
        """The next batch: rank 0 alone while any of it can go, else the oldest items (for
        ordinary round trips only); never an item whose key a batch in flight holds."""
        rank = self._rank
        if rank is not None and self._first_rank_waiting:
            batch, _ = self._pick([entry for entry in self._waiting if rank(entry[0]) == 0])
            if batch:
                taken = {id(future) for _, future in batch}
                self._waiting = [entry for entry in self._waiting if id(entry[1]) not in taken]
                self._first_rank_waiting -= len(batch)
                return batch
        if first_rank_only:
            return []
        batch, self._waiting = self._pick(self._waiting)
        if rank is not None:
            self._first_rank_waiting -= sum(1 for item, _ in batch if rank(item) == 0)
        return batch

    def _pick(self, waiting: list[tuple[T, asyncio.Future[R]]]
              ) -> tuple[list[tuple[T, asyncio.Future[R]]], list[tuple[T, asyncio.Future[R]]]]:
        """The oldest of ``waiting`` whose key no batch in flight holds (up to a batch), and
        the rest."""
        if self._key is None or not self._in_flight_keys:
            return waiting[:self._max_batch], waiting[self._max_batch:]
        batch: list[tuple[T, asyncio.Future[R]]] = []
        left: list[tuple[T, asyncio.Future[R]]] = []
        blocked = set(self._in_flight_keys)
        for entry in waiting:
            if len(batch) < self._max_batch and self._key(entry[0]) not in blocked:
                batch.append(entry)
            else:
                left.append(entry)
        return batch, left

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batches += 1
        if len(batch) > 1:
            try:
                results = await self._run_batch([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError("a batch must return one result per item")
            except Exception as exc:
                # Retried one by one below, so a bad item fails alone.
                log.warning("group_commit_batch_failed", size=len(batch),
                            error=type(exc).__name__)
            else:
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
                return
        for item, future in batch:
            try:
                result = await self._run_one(item)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)
