"""An in-process run queue fair between accounts: lanes by rank, accounts round-robin within.

Lane 0 (transactional) is always served before lane 1 (bulk). Within a lane, accounts with
waiting items take turns (deficit round robin with a quantum of ``weight`` items, cost 1 per
item): an account of weight w gets w items per round while others wait, and alone it gets
every item. Within an account, items keep their arrival order.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
Weight = Callable[[str], int]


class _Lane(Generic[T]):
    """The waiting items of one rank: a FIFO per account, accounts in round-robin order."""

    def __init__(self) -> None:
        self.accounts: OrderedDict[str, deque[T]] = OrderedDict()
        self.credit = 0  # what the account at the head may still take in its turn
        self.size = 0


class FairQueue(Generic[T]):
    """Strict priority between lanes; deficit round robin between accounts within a lane."""

    def __init__(self, lanes: int = 2, weight: Weight = lambda _: 1) -> None:
        self._lanes: list[_Lane[T]] = [_Lane() for _ in range(lanes)]
        self._weight = weight
        self._getters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return sum(lane.size for lane in self._lanes)

    def empty(self) -> bool:
        """True when nothing waits."""
        return not len(self)

    def waiting(self, rank: int, account: str) -> int:
        """How many items of ``account`` wait in lane ``rank``."""
        items = self._lanes[rank].accounts.get(account)
        return len(items) if items is not None else 0

    def put_nowait(self, rank: int, account: str, item: T) -> None:
        """Queue ``item`` behind the account's earlier ones."""
        lane = self._lanes[rank]
        items = lane.accounts.get(account)
        if items is None:
            items = lane.accounts[account] = deque()
        items.append(item)
        lane.size += 1
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                break

    def get_nowait(self) -> tuple[int, str, T]:
        """The next item by lane, then account turn: (rank, account, item)."""
        for rank, lane in enumerate(self._lanes):
            if not lane.size:
                continue
            account, items = next(iter(lane.accounts.items()))
            if lane.credit <= 0:
                lane.credit = max(1, self._weight(account))
            item = items.popleft()
            lane.size -= 1
            lane.credit -= 1
            if not items:
                del lane.accounts[account]
                lane.credit = 0
            elif lane.credit <= 0:
                lane.accounts.move_to_end(account)  # its turn is over: next account
            return rank, account, item
        raise asyncio.QueueEmpty

    async def get(self) -> tuple[int, str, T]:
        """Wait for an item; see ``get_nowait``."""
        while self.empty():
            getter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except asyncio.CancelledError:
                if getter.done() and not getter.cancelled() and not self.empty():
                    self._wake_one()  # pass the wake-up on
                raise
        return self.get_nowait()

    def _wake_one(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return
