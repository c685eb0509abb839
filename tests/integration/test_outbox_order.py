"""The outbox relay publishes billing events ahead of a backlog of status events."""

from __future__ import annotations

import asyncpg
from prometheus_client import CollectorRegistry

from dispatcher.events.outbox import BATCH, OutboxRelay
from dispatcher.metrics import Metrics


class RecordingExchange:
    """Stands in for an aio-pika exchange: keeps what was published, in order."""

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        self.name, self.log = name, log

    async def publish(self, message: object, routing_key: str, mandatory: bool = True) -> None:
        self.log.append((self.name, routing_key))


async def test_a_billing_event_overtakes_a_backlog_of_status_events(pool: asyncpg.Pool) -> None:
    await pool.execute("UPDATE outbox SET published_at = now() WHERE published_at IS NULL")
    backlog = 3 * BATCH
    await pool.execute(
        "INSERT INTO outbox (event_id, exchange, routing_key, body) "
        "SELECT gen_random_uuid(), 'events', 'status.sms.sent', '{}'::jsonb "
        "FROM generate_series(1, $1)", backlog)
    await pool.execute("INSERT INTO outbox (event_id, exchange, routing_key, body) "
                       "VALUES (gen_random_uuid(), 'billing', 'balance.low', '{}'::jsonb)")
    published: list[tuple[str, str]] = []
    exchanges = {name: RecordingExchange(name, published) for name in ("events", "billing")}
    relay = OutboxRelay(pool, exchanges, Metrics(CollectorRegistry()))  # type: ignore[arg-type]

    assert await relay.relay_once() == 1
    assert published == [("billing", "balance.low")]
    while await relay.relay_once():
        pass
    assert len(published) == backlog + 1
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
