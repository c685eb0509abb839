"""Wait out a database outage: one prober with backoff, any number of waiting handlers.

While PostgreSQL is unreachable the consumer's workers park here with their messages unacked
(no redelivery, no delivery counted) and ``down`` tells readiness to report no consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from dispatcher.loops import Backoff

log = structlog.get_logger(__name__)

Probe = Callable[[], Awaitable[object]]
NO_PROBE_PAUSE_SECONDS = 1.0
# Probes while waiting: soon after the database is back, never more than every 5 s.
PROBE_BACKOFF = Backoff(first=0.25, cap=5.0)


class DatabaseWatch:
    """Tells waiting handlers when the database answers again."""

    def __init__(self, probe: Probe | None, *, backoff: Backoff = PROBE_BACKOFF) -> None:
        self._probe = probe
        self._backoff = backoff
        self._up = asyncio.Event()
        self._up.set()
        self._gave_up = asyncio.Event()
        self._prober: asyncio.Task[None] | None = None

    @property
    def down(self) -> bool:
        """True while an outage is being waited out."""
        return not self._up.is_set()

    def give_up(self) -> None:
        """Shutting down: every waiter returns None at once."""
        self._gave_up.set()

    async def wait_until_up(self) -> bool | None:
        """Wait until a probe succeeds: True if it had to wait (a real outage), False if the
        database answered at once, None if ``give_up`` came first."""
        if self._gave_up.is_set():
            return None
        if self._up.is_set():
            if await self._probe_once():
                return False
            self._up.clear()
            log.warning("database_unreachable")
        if self._prober is None or self._prober.done():
            self._prober = asyncio.create_task(self._probe_until_up(), name="database-watch")
        up = asyncio.create_task(self._up.wait())
        gave_up = asyncio.create_task(self._gave_up.wait())
        await asyncio.wait([up, gave_up], return_when=asyncio.FIRST_COMPLETED)
        for waiter in (up, gave_up):
            waiter.cancel()
        return True if self._up.is_set() else None

    async def _probe_once(self) -> bool:
        if self._probe is None:
            await asyncio.sleep(NO_PROBE_PAUSE_SECONDS)
            return True
        try:
            await self._probe()
        except Exception as exc:  # whatever the probe met, the database did not answer
            log.debug("database_probe_failed", error=type(exc).__name__)
            return False
        return True

    async def _probe_until_up(self) -> None:
        failures = 0
        while not self._gave_up.is_set():
            failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gave_up.wait(), self._backoff.delay(failures))
            if self._gave_up.is_set():
                return
            if await self._probe_once():
                log.info("database_reachable_again", probes=failures)
                self._up.set()
                return
