"""``loops.forever``: an outage is retried with backoff and counted, a bug propagates."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from dispatcher.errors import ServiceUnavailable
from dispatcher.loops import Backoff, every, forever, is_outage
from dispatcher.metrics import Metrics

FAST = Backoff(first=0.001, cap=0.01)


def failures(metrics: Metrics, loop: str) -> float:
    value = metrics.registry.get_sample_value("dispatcher_loop_failures_total", {"loop": loop})
    return value or 0.0


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError(), TimeoutError(), ServiceUnavailable(),
    asyncpg.ConnectionDoesNotExistError("closed"), asyncpg.CannotConnectNowError("starting"),
    asyncpg.AdminShutdownError("shutdown"), asyncpg.DeadlockDetectedError("deadlock")])
def test_outages(exc: BaseException) -> None:
    assert is_outage(exc)
    assert is_outage(ExceptionGroup("task group", [exc, OSError()]))
    assert not is_outage(ExceptionGroup("task group", [exc, KeyError()]))


@pytest.mark.parametrize("exc", [
    KeyError("x"), AssertionError(), asyncpg.UniqueViolationError("dup"),
    asyncpg.UndefinedColumnError("no such column")])
def test_bugs(exc: BaseException) -> None:
    assert not is_outage(exc)


async def test_an_outage_is_retried_with_backoff_and_counted() -> None:
    metrics, stop = Metrics(CollectorRegistry()), asyncio.Event()
    calls = 0

    async def body() -> None:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise ConnectionRefusedError("database down")
        stop.set()
    await asyncio.wait_for(forever("broadcast_runner", body, stop, metrics, backoff=FAST), 5)
    assert calls == 4
    assert failures(metrics, "broadcast_runner") == 3


async def test_a_bug_propagates() -> None:
    metrics, stop = Metrics(CollectorRegistry()), asyncio.Event()

    async def body() -> None:
        raise KeyError("bug")
    with pytest.raises(KeyError):
        await forever("resumer", body, stop, metrics, backoff=FAST)
    assert failures(metrics, "resumer") == 0


async def test_every_tolerates_the_transient_errors_it_is_given() -> None:
    metrics, stop = Metrics(CollectorRegistry()), asyncio.Event()
    calls = 0

    class ProviderDown(Exception):
        pass

    async def work() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            stop.set()
        raise ProviderDown
    await asyncio.wait_for(every("reconciler", 0.001, work, stop, metrics, backoff=FAST,
                                 transient=(ProviderDown,)), 5)
    assert calls == 3
