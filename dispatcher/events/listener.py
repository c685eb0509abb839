"""Keep a LISTEN up for as long as the service runs, whatever happens to its connection.

A LISTEN lives on one connection: when that connection dies (PostgreSQL restarted, the backend
terminated, the network cut) notifications stop and nothing else would notice. ``keep_listening``
notices (asyncpg's termination callback, plus a periodic ``SELECT 1`` for a silent socket),
reconnects with backoff and, after every (re)connect, runs the caller's rescan so the
notifications sent while nobody listened are covered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from dispatcher.db import Connect, Connection, Notified, listening
from dispatcher.errors import ServiceUnavailable

log = structlog.get_logger(__name__)

DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                 ServiceUnavailable)


@dataclass(frozen=True)
class ListenPolicy:
    """How often the connection is checked, and how reconnects back off."""

    check_seconds: float = 10.0
    check_timeout_seconds: float = 5.0
    backoff_min_seconds: float = 0.5
    backoff_max_seconds: float = 30.0

    def backoff(self, failures: int) -> float:
        """Seconds to wait before reconnect number ``failures`` (1, 2, …): doubling, capped."""
        return float(min(self.backoff_max_seconds,
                         self.backoff_min_seconds * 2 ** max(0, failures - 1)))


DEFAULT_POLICY = ListenPolicy()


async def keep_listening(pool: asyncpg.Pool, connect: Connect | None, channel: str,
                         callback: Notified, rescan: Callable[[], Awaitable[object]],
                         stop: asyncio.Event, *, policy: ListenPolicy = DEFAULT_POLICY,
                         reconnected: Callable[[], None] = lambda: None) -> None:
    """LISTEN on ``channel`` until ``stop``; ``rescan`` runs once LISTEN is up, every time.

    ``reconnected`` is called after each successful (re)connect but the first (for a metric).
    """
    failures = 0
    connected_before = False

    async def session() -> None:
        nonlocal connected_before, failures
        async with listening(pool, connect, channel, callback) as conn:
            await rescan()
            if connected_before:
                reconnected()
                log.info("listen_reconnected", channel=channel, failures=failures)
            connected_before, failures = True, 0
            await _until_lost(conn, policy)

    while not stop.is_set():
        error = "terminated"
        try:
            await _unless_stopped(session(), stop)
        except DATABASE_ERRORS as exc:
            error = type(exc).__name__
        if stop.is_set():
            return
        failures += 1
        log.warning("listen_connection_lost", channel=channel, error=error, failures=failures)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=policy.backoff(failures))


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Run ``work``, cancelled if ``stop`` is set first (a connect or a wait must not hold up
    shutdown)."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if not task.cancelled():
        task.result()


async def _until_lost(conn: Connection, policy: ListenPolicy) -> None:
    """Return once the connection is gone; a failed liveness check raises."""
    lost = asyncio.Event()

    def on_lost(_conn: object) -> None:
        lost.set()
    conn.add_termination_listener(on_lost)
    try:
        while not (lost.is_set() or conn.is_closed()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), timeout=policy.check_seconds)
            if not (lost.is_set() or conn.is_closed()):
                await _check(conn, policy)
    finally:
        conn.remove_termination_listener(on_lost)


async def _check(conn: Connection, policy: ListenPolicy) -> None:
    """One round trip: a socket can die without a FIN (a partition), only this tells."""
    try:
        await conn.fetchval("SELECT 1", timeout=policy.check_timeout_seconds)
    except BaseException:
        conn.terminate()  # never UNLISTEN (or pool) a connection that may be dead
        raise
