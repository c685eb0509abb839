"""The consumer's watchdog reopens a channel that stayed closed while the connection is up.

A robust connection restores its channels after a reconnect, but one whose restore failed (a
node whose queues were not up yet) stays closed for good: the outbox relay's publish channel
and the credits listener's channel included. Fakes stand in for aio-pika here; the real thing
runs in ``tests/cluster``.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from dispatcher.dispatch import consumer as consumer_module
from dispatcher.dispatch.consumer import Consumer
from dispatcher.events.topology import Names
from dispatcher.metrics import Metrics


class FakeChannel:
    def __init__(self, closed: bool) -> None:
        self.is_closed = closed
        self.reopened = 0

    async def reopen(self) -> None:
        self.reopened += 1
        self.is_closed = False


async def test_closed_publish_and_watched_channels_are_reopened(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "CONSUME_CHECK_SECONDS", 0.01)
    connected = asyncio.Event()
    connected.set()
    connection = SimpleNamespace(is_closed=False, connected=connected)

    async def handle(*_: object) -> None:
        raise AssertionError("no job here")
    consumer = Consumer(connection, Names("watch"), handle,  # type: ignore[arg-type]
                        Metrics(CollectorRegistry()), prefetch=1, workers=1, delivery_limit=5)
    publish, credits, fine = FakeChannel(True), FakeChannel(True), FakeChannel(False)
    consumer._publish_channel = publish  # type: ignore[assignment]
    consumer.watch_channel("credits", credits)  # type: ignore[arg-type]
    consumer.watch_channel("fine", fine)  # type: ignore[arg-type]
    watch = asyncio.create_task(consumer._keep_consuming())
    try:
        async with asyncio.timeout(5):
            while not (publish.reopened and credits.reopened):
                await asyncio.sleep(0.01)
    finally:
        consumer._stopping = True
        await asyncio.wait_for(watch, 1)
    assert (publish.reopened, credits.reopened, fine.reopened) == (1, 1, 0)


async def test_nothing_is_reopened_while_the_connection_is_down(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "CONSUME_CHECK_SECONDS", 0.01)
    connection = SimpleNamespace(is_closed=False, connected=asyncio.Event())

    async def handle(*_: object) -> None:
        raise AssertionError("no job here")
    consumer = Consumer(connection, Names("watch"), handle,  # type: ignore[arg-type]
                        Metrics(CollectorRegistry()), prefetch=1, workers=1, delivery_limit=5)
    publish = FakeChannel(True)
    consumer._publish_channel = publish  # type: ignore[assignment]
    watch = asyncio.create_task(consumer._keep_consuming())
    await asyncio.sleep(0.1)
    consumer._stopping = True
    await asyncio.wait_for(watch, 1)
    assert publish.reopened == 0
