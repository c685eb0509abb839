"""The outbox relay: publish events written in the database's transactions, with confirms.

Rows are marked published only after the broker confirmed them, in the transaction that
claimed them (``FOR UPDATE SKIP LOCKED``, so several replicas share the work). A crash between
the confirm and the commit republishes: consumers deduplicate by ``event_id``.

Billing events are published ``mandatory``: one the broker returns because no queue is bound
(the billing service not deployed yet, its queue deleted) would otherwise be dropped and the
top-up never requested. It stays unpublished and is retried with backoff (``next_attempt_at``)
until a queue exists; meanwhile the rows behind it flow. Status events are not mandatory: one
nobody subscribes to is fine.
"""

from __future__ import annotations

import asyncio
import json

import aio_pika
import aio_pika.exceptions
import aiormq.abc
import asyncpg
import structlog
from aio_pika.abc import AbstractExchange
from asyncpg.pool import PoolConnectionProxy

from dispatcher.db import Connect
from dispatcher.events.listener import DEFAULT_POLICY, ListenPolicy, keep_listening
from dispatcher.metrics import Metrics
from dispatcher.queries import q

log = structlog.get_logger(__name__)

NOTIFY_CHANNEL = "dispatcher_outbox"
BATCH = 200
# A safety net for a notification still missed (a reconnect of the LISTEN triggers a pass too).
SWEEP_SECONDS = 15.0
PUBLISH_TIMEOUT_SECONDS = 10.0
RETRY_SECONDS = 1.0
# Backoff of an event returned unroutable: doubling from the first, capped at the second.
UNROUTABLE_RETRY_SECONDS = (1.0, 60.0)
MANDATORY_EXCHANGES = frozenset({"billing"})
RELAY_ERRORS = (TimeoutError, OSError, aio_pika.exceptions.AMQPError,
                aio_pika.exceptions.ChannelInvalidStateError, asyncpg.PostgresError,
                asyncpg.InterfaceError)


def event_type(routing_key: str) -> str:
    """The AMQP ``type`` of an event: its message's ``messageType`` in docs/asyncapi.yaml
    (``status``, ``account_status``; a billing event's own type)."""
    if routing_key.startswith("status."):
        return "status"
    if routing_key.startswith("account."):
        return "account_status"
    return routing_key


class OutboxRelay:
    """Wakes on NOTIFY and publishes every unpublished outbox row: billing first, oldest first."""

    def __init__(self, pool: asyncpg.Pool, exchanges: dict[str, AbstractExchange],
                 metrics: Metrics, *, listen_connect: Connect | None = None,
                 listen_policy: ListenPolicy = DEFAULT_POLICY,
                 unroutable_retry: tuple[float, float] = UNROUTABLE_RETRY_SECONDS) -> None:
        self._pool = pool
        self._unroutable_retry = unroutable_retry
        self._listen_connect = listen_connect
        self._listen_policy = listen_policy
        self._exchanges = exchanges
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._billing_pass = False  # the last pass carried billing events

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; every (re)connect of the LISTEN triggers a pass."""

        async def rescan() -> None:
            self._wake.set()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(keep_listening(
                self._pool, self._listen_connect, NOTIFY_CHANNEL, self._notified, rescan, stop,
                policy=self._listen_policy,
                reconnected=self._metrics.listen_reconnects.labels(listener="outbox").inc))
            tasks.create_task(self._relay(stop))

    async def _relay(self, stop: asyncio.Event) -> None:
        """Relay passes until ``stop``; a broker or database hiccup is retried, not fatal."""
        while not stop.is_set():
            self._wake.clear()
            pause = SWEEP_SECONDS
            try:
                # Issue 15: no extra empty pass (4 statements) after one that emptied the
                # outbox: a row committed since then has notified, so the wait below returns
                # at once. Billing rows go in passes of their own, so after one the status
                # events behind them are looked at too.
                while (handled := await self.relay_once()) and (
                        handled >= BATCH or self._billing_pass):
                    pass
                pause = await self._update_backlog()
            except RELAY_ERRORS as exc:
                if stop.is_set():  # the channel closed under us while shutting down
                    break
                # Nothing was marked: the rows are published again on the next pass.
                log.warning("outbox_relay_failed", error=type(exc).__name__)
                pause = RETRY_SECONDS
            await self._sleep(stop, pause)

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        """Until a NOTIFY, a stop, or ``seconds``."""
        waiters = [asyncio.create_task(self._wake.wait()), asyncio.create_task(stop.wait())]
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def relay_once(self) -> int:
        """Publish one batch; returns how many rows were handled (published or deferred)."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(q("outbox_claim_billing"), BATCH)
            self._billing_pass = bool(rows)
            rows = rows or await conn.fetch(q("outbox_claim"), BATCH)
            if not rows:
                return 0
            returned = [row for row, routed in zip(rows, await self._publish_all(rows),
                                                   strict=True) if not routed]
            if returned:
                await self._defer(conn, returned)
            deferred = {row["id"] for row in returned}
            await self._mark(conn, [row["id"] for row in rows if row["id"] not in deferred])
        log.debug("outbox_relayed", events=len(rows) - len(returned))
        return len(rows)

    async def _mark(self, conn: PoolConnectionProxy[asyncpg.Record], ids: list[int]) -> None:
        """Mark confirmed rows published (a crash before this commit republishes them)."""
        await conn.execute(q("outbox_mark_published"), ids)

    async def _defer(self, conn: PoolConnectionProxy[asyncpg.Record],
                     rows: list[asyncpg.Record]) -> None:
        """Leave returned rows unpublished, due again after their backoff."""
        first, cap = self._unroutable_retry
        await conn.execute(q("outbox_defer"), [row["id"] for row in rows], first, cap)
        self._metrics.outbox_returned.inc(len(rows))
        log.warning("outbox_events_unroutable", events=len(rows),
                    routing_keys=sorted({row["routing_key"] for row in rows}),
                    attempts=max(row["attempts"] for row in rows) + 1)

    async def _publish_all(self, rows: list[asyncpg.Record]) -> list[bool]:
        """Publish the batch at once and wait for every confirm; per row, False when returned.

        The publishes are in flight together (the broker confirms them in batches), in row
        order: a channel takes publishes one at a time, first come first served. If any fails,
        the others are still awaited before the error is raised, so nothing of this pass is
        left running when its transaction rolls back (every row is published again).
        """
        results = await asyncio.gather(*(self._publish(row) for row in rows),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [bool(result) for result in results]

    async def _publish(self, row: asyncpg.Record) -> bool:
        """Publish and wait for the confirm; False when the broker returned it unroutable."""
        body = row["body"] if isinstance(row["body"], str) else json.dumps(row["body"])
        message = aio_pika.Message(
            body.encode(), content_type="application/json", content_encoding="utf-8",
            message_id=str(row["event_id"]), type=event_type(row["routing_key"]),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        mandatory = row["exchange"] in MANDATORY_EXCHANGES
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                confirm = await self._exchanges[row["exchange"]].publish(
                    message, routing_key=row["routing_key"], mandatory=mandatory)
        except aio_pika.exceptions.PublishError:  # a channel opened with on_return_raises
            return False
        if isinstance(confirm, aiormq.abc.DeliveredMessage):  # returned, then confirmed
            return False
        if row["exchange"] == "billing" and row["routing_key"] in ("balance.low",
                                                                    "balance.depleted"):
            self._metrics.low_balance_events.labels(
                type=row["routing_key"].replace(".", "_")).inc()
        return True

    async def _update_backlog(self) -> float:
        """Refresh the outbox gauges; returns how long the relay may sleep before a retry."""
        row = await self._pool.fetchrow(q("outbox_backlog"))
        assert row is not None
        self._metrics.outbox_backlog.set(row["backlog"])
        self._metrics.outbox_lag_seconds.set(row["lag_seconds"])
        self._metrics.outbox_unroutable.set(row["unroutable"])
        if row["next_attempt_in"] is None:
            return SWEEP_SECONDS
        return min(SWEEP_SECONDS, max(0.25, float(row["next_attempt_in"])))
