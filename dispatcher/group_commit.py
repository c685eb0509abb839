"""Group commit: concurrent callers share one database round trip.

The first call while nothing is in flight goes out at once (no added latency when idle); calls
made while a batch is in flight wait for it and go together in the next one. A batch that fails
is retried one item at a time, so one bad item fails alone and never takes its neighbours with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import structlog

T = TypeVar("T")
R = TypeVar("R")
log = structlog.get_logger(__name__)


class GroupCommit(Generic[T, R]):
    """Runs ``run_batch`` over everything submitted meanwhile; results go back in order."""

    def __init__(self, run_batch: Callable[[list[T]], Awaitable[list[R]]],
                 run_one: Callable[[T], Awaitable[R]], *, max_batch: int = 200,
                 concurrency: int = 2) -> None:
        if max_batch < 1 or concurrency < 1:
            raise ValueError("max_batch and concurrency must be positive")
        self._run_batch = run_batch
        self._run_one = run_one
        self._max_batch = max_batch
        self._concurrency = concurrency
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._flushing = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # how many round trips were made (for tests and metrics)

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch and wait for its own result."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._flushing < self._concurrency:
            self._flushing += 1
            task = asyncio.create_task(self._flush(), name="group-commit")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[:self._max_batch]
                del self._waiting[:self._max_batch]
                await self._run(batch)
        finally:
            self._flushing -= 1

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
