"""Jobs for the pipeline benchmark: building them, publishing them confirmed, counting them sent."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aio_pika
import asyncpg
from aio_pika.abc import AbstractChannel

from dispatcher.events.topology import Names

PUBLISH_WINDOW = 500  # confirms awaited together
SENDER = "+14155550199"


@dataclass(frozen=True)
class Batch:
    """Jobs of one measurement: ids share ``tag`` and round-robin over ``accounts``."""

    tag: str
    priority: str
    bodies: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        return len(self.bodies)


def make_batch(tag: str, n: int, accounts: list[str], priority: str = "bulk") -> Batch:
    """``n`` one-segment SMS jobs, wire form v1, with unique ids and recipients."""
    bodies = []
    for i in range(n):
        job_id = f"{tag}-{i:07d}"
        body = {"schema_version": 1, "id": job_id, "kind": "sms",
                "account": accounts[i % len(accounts)], "to": f"+1415555{i % 10000:04d}",
                "from": SENDER, "body": f"benchmark message {i}", "priority": priority}
        bodies.append((job_id, json.dumps(body, separators=(",", ":")).encode()))
    return Batch(tag, priority, bodies)


def message(job_id: str, body: bytes) -> aio_pika.Message:
    """The AMQP message ``JobPublisher`` would send for this job (persistent, id, type)."""
    return aio_pika.Message(body, message_id=job_id, type="sms", content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def publish(channel: AbstractChannel, names: Names, batch: Batch) -> float:
    """Publish the batch to the jobs exchange with confirms; returns seconds taken."""
    exchange = await channel.get_exchange(names.jobs_exchange)
    started = time.perf_counter()
    key = f"sms.{batch.priority}"
    for start in range(0, batch.size, PUBLISH_WINDOW):
        window = batch.bodies[start:start + PUBLISH_WINDOW]
        await asyncio.gather(*(exchange.publish(message(j, b), routing_key=key, timeout=30)
                               for j, b in window))
    return time.perf_counter() - started


async def queue_depth(channel: AbstractChannel, name: str) -> int:
    """Messages ready in a queue, asked of the broker now.

    A passive declare through aio-pika's robust channel answers from its cache after the first
    time (with the count of that first answer), so this goes to the underlying aiormq channel.
    """
    underlay = await channel.get_underlay_channel()
    declared = await underlay.queue_declare(name, passive=True)
    return int(declared.message_count or 0)


async def sent_count(pool: asyncpg.Pool, tag: str) -> int:
    """Jobs of the batch that reached ``sent`` (or any later status)."""
    return int(await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE job_id LIKE $1 AND sent_at IS NOT NULL", tag + "-%"))


@dataclass(frozen=True)
class Span:
    """A batch as the database saw it: jobs sent, first begin, last sent (epoch seconds)."""

    sent: int
    other: int
    first_begin: float
    last_sent: float

    @property
    def rate(self) -> float:
        seconds = self.last_sent - self.first_begin
        return self.sent / seconds if seconds > 0 else 0.0


async def span(pool: asyncpg.Pool, tag: str) -> Span:
    """Count and time the batch's jobs from their rows."""
    row = await pool.fetchrow(
        "SELECT count(*) FILTER (WHERE sent_at IS NOT NULL) AS sent,"
        "       count(*) FILTER (WHERE sent_at IS NULL) AS other,"
        "       extract(epoch FROM min(created_at))::float8 AS first_begin,"
        "       extract(epoch FROM max(sent_at))::float8 AS last_sent"
        "  FROM jobs WHERE job_id LIKE $1", tag + "-%")
    assert row is not None
    return Span(row["sent"], row["other"], row["first_begin"] or 0.0, row["last_sent"] or 0.0)


async def sent_times(pool: asyncpg.Pool, job_ids: list[str]) -> dict[str, float]:
    """Epoch seconds at which each job was marked sent."""
    rows = await pool.fetch(
        "SELECT job_id, extract(epoch FROM sent_at)::float8 AS at FROM jobs"
        " WHERE job_id = ANY($1::text[]) AND sent_at IS NOT NULL", job_ids)
    return {r["job_id"]: r["at"] for r in rows}
