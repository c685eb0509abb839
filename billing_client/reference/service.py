"""``ReferenceBillingService``: open everything in order, run, and close in reverse.

Start-up: pool → schema → broker → topology → outbox relay and top-up worker → consumer
(a due retry left by an earlier run is picked up by the worker at once). Stop: stop consuming
and drain in-flight events, stop the loops, let running charges finish, relay what is left,
then close the broker and the pool. A background task that dies stops the service.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import aio_pika
import aio_pika.exceptions
import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection

from billing_client.amqp import connect_robust
from billing_client.publisher import ConfirmedPublisher
from billing_client.reference.clock import Clock, utc_now
from billing_client.reference.consumer import EventConsumer, declare
from billing_client.reference.decision import Verdict, check_limits, decide
from billing_client.reference.errors import ServiceUnavailable
from billing_client.reference.gateway import FakeGateway, PaymentGateway
from billing_client.reference.handler import EventHandler
from billing_client.reference.outbox import OutboxRelay
from billing_client.reference.settings import BillingSettings
from billing_client.reference.store import BillingStore
from billing_client.reference.topups import TopupWorker

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_SECONDS = 15.0


async def open_pool(settings: BillingSettings) -> asyncpg.Pool:
    """A small pool, or ``ServiceUnavailable`` saying PostgreSQL cannot be reached."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            pool = await asyncpg.create_pool(settings.database_url, min_size=1,
                                             max_size=settings.db_pool_max, command_timeout=30)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise ServiceUnavailable(
            f"PostgreSQL is not reachable ({type(exc).__name__})") from exc
    assert pool is not None
    return pool


async def open_broker(settings: BillingSettings) -> AbstractRobustConnection:
    """A robust connection, or ``ServiceUnavailable`` saying RabbitMQ cannot be reached."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            return await connect_robust(settings.amqp_url)
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPConnectionError) as exc:
        raise ServiceUnavailable(
            f"RabbitMQ is not reachable ({type(exc).__name__})") from exc


class ReferenceBillingService:
    """Consumes balance events, charges the gateway and replies; usable in-process."""

    def __init__(self, settings: BillingSettings, gateway: PaymentGateway | None = None, *,
                 clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or utc_now
        self.gateway: PaymentGateway = gateway or FakeGateway(
            timeout_delay=settings.fake_timeout_delay_seconds,
            latency=settings.fake_charge_latency_seconds)
        self._stop = asyncio.Event()
        self._pool: asyncpg.Pool | None = None
        self._amqp: AbstractRobustConnection | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._relay: OutboxRelay | None = None
        self._worker: TopupWorker | None = None
        self._consumer: EventConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def decisions(self) -> Counter[str]:
        """How many events ended in each decision (``start_topup``, ``duplicate``, …)."""
        return Counter() if self._consumer is None else self._consumer.decisions

    async def start(self) -> None:
        """Open everything and start consuming; on failure, close what was opened."""
        try:
            await self._open()
        except BaseException:
            await self.stop()
            raise
        log.info("billing_service_started", prefix=self.settings.amqp_prefix,
                 queue=self.settings.queue)

    async def _open(self) -> None:
        s = self.settings
        self._pool = await open_pool(s)
        store = BillingStore(self._pool, self.clock, defaults_of(s))
        await store.ensure_schema()
        self._amqp = await open_broker(s)
        channel = await self._amqp.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await declare(channel, s)
        self._publisher = ConfirmedPublisher(None, channel, exchange)
        self._relay = OutboxRelay(self._pool, self._publisher, sweep_seconds=s.outbox_sweep_seconds)
        self._worker = TopupWorker(store, self.gateway, s, self._relay.wake)
        self._watch("billing-outbox-relay", self._relay.run(self._stop))
        self._watch("billing-topup-worker", self._worker.run(self._stop))
        self._consumer = EventConsumer(self._amqp, s, EventHandler(store, self._worker.wake).handle)
        await self._consumer.start()

    def _watch(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        """Run a named background task; if it dies, say so and stop the service."""
        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background_task_died", task=name)
                self._stop.set()
        self._tasks.append(asyncio.create_task(guarded(), name=name))

    def wake(self) -> None:
        """Look for due top-ups now (after the injected clock moved, or an owner action)."""
        if self._worker is not None:
            self._worker.wake()

    async def enable_auto_recharge(self, account: str) -> Verdict:
        """Owner action: turn auto-recharge back on; still below the threshold: charge now."""
        store = self._store()
        await store.enable(account)
        return await self._charge_if_low(store, account)

    async def set_recharge_limits(self, account: str, **limits: Any) -> Verdict:
        """Owner action: set the account's limits (see ``BillingStore.set_limits``); a raised
        cap charges a still-low account at once."""
        check_limits(**limits)
        store = self._store()
        await store.set_limits(account, **limits)
        return await self._charge_if_low(store, account)

    async def recharge_status(self, account: str) -> dict[str, Any] | None:
        """The account's recharge limits and safety state."""
        return await self._store().status(account)

    def _store(self) -> BillingStore:
        if self._pool is None:
            raise ServiceUnavailable("the billing service is not running")
        return BillingStore(self._pool, self.clock, defaults_of(self.settings))

    async def _charge_if_low(self, store: BillingStore, account: str) -> Verdict:
        verdict, _ = await store.charge_now_if_low(account, decide)
        self.wake()
        return verdict

    def request_stop(self) -> None:
        """Ask the service to stop (signal handlers call this)."""
        self._stop.set()

    async def wait(self) -> None:
        """Return when a stop was requested or a background task died."""
        await self._stop.wait()

    async def stop(self) -> None:
        """Drain and close everything in reverse order of opening (safe to call twice)."""
        self._stop.set()
        timeout = self.settings.shutdown_timeout_seconds
        if self._consumer is not None:
            await self._consumer.stop(timeout)
        await self._stop_tasks(timeout)
        if self._worker is not None:
            await self._worker.drain(timeout)
        await self._flush_outbox()
        if self._publisher is not None:
            await self._publisher.close()
        if self._amqp is not None:
            await self._amqp.close()
        if self._pool is not None:
            await self._pool.close()
        self._consumer = self._worker = self._relay = self._publisher = None
        self._amqp = self._pool = None
        log.info("billing_service_stopped", prefix=self.settings.amqp_prefix)

    async def _stop_tasks(self, grace_seconds: float) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _flush_outbox(self) -> None:
        """Relay replies committed while stopping; what fails stays for the next start."""
        if self._relay is None:
            return
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout_seconds):
                await self._relay.relay_once()
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            log.warning("outbox_flush_failed")


def defaults_of(settings: BillingSettings) -> tuple[int, int]:
    """The service-wide defaults of the per-account recharge limits."""
    return settings.hourly_charge_limit, settings.decline_limit
