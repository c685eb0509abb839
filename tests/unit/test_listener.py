"""keep_listening with fake connections: a silent socket is found by the liveness check."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from dispatcher.events.listener import ListenPolicy, keep_listening

POLICY = ListenPolicy(check_seconds=0.01, check_timeout_seconds=0.01, backoff_min_seconds=0.01,
                      backoff_max_seconds=0.01)


class FakeConnection:
    """Listens; once ``dead``, every round trip times out (a partition: no FIN ever arrives)."""

    def __init__(self, dead: bool) -> None:
        self.dead = dead
        self.terminated = False
        self.channels: list[str] = []

    async def execute(self, *_: Any) -> str:
        return "SELECT 1"

    async def add_listener(self, channel: str, _callback: object) -> None:
        self.channels.append(channel)

    async def remove_listener(self, channel: str, _callback: object) -> None:
        if not self.terminated:  # like asyncpg: nothing to UNLISTEN on a closed connection
            assert not self.dead, "UNLISTEN on a dead socket would hang"
            self.channels.remove(channel)

    def add_termination_listener(self, _callback: object) -> None: ...

    def remove_termination_listener(self, _callback: object) -> None: ...

    async def fetchval(self, _sql: str, timeout: float) -> int:
        if self.dead:
            raise TimeoutError
        return 1

    def is_closed(self) -> bool:
        return self.terminated

    def terminate(self) -> None:
        self.terminated = True

    async def close(self, timeout: float) -> None:
        self.terminated = True


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = ListenPolicy(backoff_min_seconds=0.5, backoff_max_seconds=4.0)
    assert [policy.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]


async def test_a_connection_failing_its_liveness_check_is_replaced_and_rescanned() -> None:
    connections = [FakeConnection(dead=True), FakeConnection(dead=False)]
    opened: list[FakeConnection] = []
    rescans: list[int] = []
    reconnected: list[int] = []
    stop = asyncio.Event()

    async def connect() -> asyncpg.Connection:
        opened.append(connections[len(opened)])
        return opened[-1]  # type: ignore[return-value]

    async def rescan() -> None:
        rescans.append(len(opened))
        if len(opened) == 2:
            stop.set()
    await asyncio.wait_for(keep_listening(
        None, connect, "chan", lambda *_: None, rescan, stop,  # type: ignore[arg-type]
        policy=POLICY, reconnected=lambda: reconnected.append(1)), timeout=5)
    assert connections[0].terminated
    assert rescans == [1, 2]
    assert reconnected == [1]
