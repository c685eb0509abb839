"""A running dispatcher with fast metric sampling, and a reader of its ``/metrics`` page."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import aiohttp
import asyncpg
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.events.topology import Names
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import (
    RunningDispatcher,
    running_dispatcher,
)
from tests.integration.sandbox_fixture import SandboxHandle

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest_asyncio.fixture
async def ops_dispatcher(settings: Settings, twilio_sandbox: SandboxHandle,
                         pool: asyncpg.Pool) -> AsyncIterator[RunningDispatcher]:
    """Like ``dispatcher``, with the database-wide metrics sampled every 0.2 s, and a queue bound
    to the billing exchange as a billing service would (else balance events stay unroutable)."""
    async with running_dispatcher(settings, twilio_sandbox, pool, metrics_interval_seconds=0.2,
                                  hold_sweep_interval_seconds=0.2) as d:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(Names(settings.amqp_prefix).billing_exchange, routing_key="balance.#")
            yield d


async def scrape(base_url: str) -> Samples:
    """Every sample of ``/metrics``, keyed by name and sorted labels."""
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (KeyError if the series does not exist)."""
    return samples[(name, tuple(sorted(labels.items())))]
