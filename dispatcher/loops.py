"""Background loops that ride out outages: backoff on infrastructure errors, crash on bugs.

``forever`` runs one loop body again and again until the stop event: an error that means
PostgreSQL or RabbitMQ is unreachable (``is_outage``) is logged, counted and retried after a
doubling backoff; any other exception is a bug and propagates, so the service exits non-zero
and its supervisor restarts it (STYLE item 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aio_pika.exceptions
import aiormq.exceptions
import asyncpg
import structlog

from dispatcher.errors import ServiceUnavailable
from dispatcher.metrics import LoopName, Metrics

log = structlog.get_logger(__name__)

# SQLSTATE classes of a database that is away or overloaded, not of a wrong statement:
# 08 connection exception, 53 insufficient resources, 57 operator intervention (shutdown,
# crash, starting up, statement timeout), 40 transaction rollback (deadlock, serialization).
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "40"})
# 25006 read_only_sql_transaction: a write reached a standby or a demoted primary (a failover).
TRANSIENT_SQLSTATES = frozenset({"25006"})
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, ServiceUnavailable, asyncpg.InterfaceError,
    asyncpg.TargetServerAttributeNotMatched,
    aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError)


def is_outage(exc: BaseException, transient: tuple[type[BaseException], ...] = ()) -> bool:
    """True when ``exc`` says a database or broker is unreachable, not that our code is wrong
    (``transient``: more error types a loop expects from what it talks to)."""
    if isinstance(exc, OUTAGE_ERRORS + transient):
        return True
    if isinstance(exc, BaseExceptionGroup):  # a loop running a TaskGroup (outbox, resumer)
        return all(is_outage(inner, transient) for inner in exc.exceptions)
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        return sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES
    return False


@dataclass(frozen=True)
class Backoff:
    """Doubling waits between retries, capped; reset once a run lasted ``cap`` seconds."""

    first: float = 0.5
    cap: float = 30.0

    def delay(self, failures: int) -> float:
        """Seconds before retry number ``failures`` (1, 2, …)."""
        return float(min(self.cap, self.first * 2 ** max(0, failures - 1)))


DEFAULT_BACKOFF = Backoff()


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def forever(name: LoopName, body: Callable[[], Awaitable[None]], stop: asyncio.Event,
                  metrics: Metrics, *, backoff: Backoff = DEFAULT_BACKOFF,
                  transient: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``body`` until ``stop``; restart it after an outage error, let a bug propagate.

    ``body`` normally loops itself until ``stop``; if it returns early it is simply run again.
    """
    failures = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            await body()
            await sleep_unless_stopped(stop, backoff.first)  # returned early: never spin
            continue
        except Exception as exc:
            outage = is_outage(exc, transient)
            if not outage or stop.is_set():
                if outage:
                    return  # a connection closed under us while shutting down
                raise
            error = exc
        if time.monotonic() - started >= backoff.cap:
            failures = 0
        failures += 1
        metrics.loop_failures.labels(loop=name).inc()
        delay = backoff.delay(failures)
        # A tolerated error that is not an outage deserves its traceback.
        log.warning("loop_failed", loop=name, error=type(error).__name__, failures=failures,
                    retry_in_seconds=delay, exc_info=error if not is_outage(error) else None)
        await sleep_unless_stopped(stop, delay)


async def every(name: LoopName, seconds: float, work: Callable[[], Awaitable[object]],
                stop: asyncio.Event, metrics: Metrics, *, backoff: Backoff = DEFAULT_BACKOFF,
                transient: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``work`` every ``seconds`` until ``stop``, through ``forever``."""
    async def body() -> None:
        while not stop.is_set():
            await work()
            await sleep_unless_stopped(stop, seconds)
    await forever(name, body, stop, metrics, backoff=backoff, transient=transient)
