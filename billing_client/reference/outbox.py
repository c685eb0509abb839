"""The outbox relay: publish replies written in our transactions, with publisher confirms.

Rows are marked published only after the broker confirmed them. A crash between the confirm and
the mark republishes; the dispatcher deduplicates by ``event_id`` and grants by
``payment_reference``. ``credits.granted`` is published mandatory (an unroutable grant stays in
the outbox until the dispatcher's queue exists); ``topup.failed`` is informational.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from billing_client.publisher import ConfirmedPublisher, PublishFailed
from billing_client.reference.queries import q
from billing_client.reference.store import DATABASE_ERRORS
from billing_client.reference.waiting import wait_any

log = structlog.get_logger(__name__)

BATCH = 100
MANDATORY = frozenset({"credits.granted"})


class OutboxRelay:
    """Publishes unpublished outbox rows oldest first, on wake-up or every sweep interval."""

    def __init__(self, pool: asyncpg.Pool, publisher: ConfirmedPublisher, *,
                 sweep_seconds: float) -> None:
        self._pool = pool
        self._publisher = publisher
        self._sweep_seconds = sweep_seconds
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Relay now (a reply was just committed)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set."""
        while not stop.is_set():
            self._wake.clear()
            try:
                while await self.relay_once() == BATCH:
                    pass
            except DATABASE_ERRORS as exc:
                log.warning("outbox_database_error", error=type(exc).__name__)
            await wait_any(self._wake, stop, seconds=self._sweep_seconds)

    async def relay_once(self) -> int:
        """Publish one batch, in order, stopping at the first failure; returns rows published."""
        published: list[int] = []
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(q("outbox_claim"), BATCH)
            for row in rows:
                if not await self._publish(row):
                    break
                published.append(row["id"])
            if published:
                await conn.execute(q("outbox_mark_published"), published)
        if published:
            log.debug("outbox_relayed", events=len(published))
        return len(published)

    async def _publish(self, row: asyncpg.Record) -> bool:
        """Publish one row; False (and a warning) when the broker did not confirm it."""
        routing_key = str(row["routing_key"])
        try:
            await self._publisher.publish(
                str(row["body"]).encode(), routing_key=routing_key,
                message_id=str(row["event_id"]), type_=routing_key,
                mandatory=routing_key in MANDATORY)
        except PublishFailed as exc:
            log.warning("outbox_publish_failed", event_id=str(row["event_id"]),
                        routing_key=routing_key, reason=exc.reason)
            return False
        return True
