"""``dispatcher run``: open everything in order, run until a stop signal, close in reverse.

Start-up: pool → broker → the country resolver's warm-up (~3 s) → topology and consumers →
outbox relay, retry sweeper, reconciler, resumer → HTTP. Shutdown (SIGTERM/SIGINT set one
event): stop consuming and drain in-flight jobs up to the timeout, stop background tasks, then
close HTTP, the broker and the pool. Background loops ride out database and broker outages with
backoff (``loops``); one that dies of a bug stops the service with exit code 1, so a supervisor
that restarts on failure restarts it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from prometheus_client import CollectorRegistry

from billing_client.amqp import connect_robust
from dispatcher.api import add_api_routes
from dispatcher.broadcasts.runner import BroadcastRunner, Broadcasts
from dispatcher.credits.flow import CreditFlowSampler
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.rates import RateCache
from dispatcher.credits.sending_settings import QuietHoursAccounts, SmartEncodingAccounts
from dispatcher.db import connect, create_pool, ping
from dispatcher.dispatch.consumer import Consumer
from dispatcher.dispatch.fairness import Fairness
from dispatcher.dispatch.handler import HandlerConfig, JobHandler
from dispatcher.dispatch.outage import DatabaseWatch
from dispatcher.dispatch.rate_slots import PostgresSlots
from dispatcher.dispatch.ratelimit import SenderLimiter, SenderRateLimiter
from dispatcher.dispatch.releaser import Clock, Releaser, utc_now
from dispatcher.dispatch.retries import RetrySweeper
from dispatcher.dispatch.shared_rate import SharedSenderRateLimiter
from dispatcher.dispatch.staging import StagingArea
from dispatcher.errors import PortUnavailable, ServiceUnavailable
from dispatcher.events.grants import CreditsListener, declare_credits_queue
from dispatcher.events.outbox import OutboxRelay
from dispatcher.events.resumer import Resumer, sweep_holds
from dispatcher.events.topology import Names
from dispatcher.http import build_app
from dispatcher.jobs.expiry import ExpirySweeper
from dispatcher.jobs.outcomes import Outcome
from dispatcher.jobs.store import JobStore
from dispatcher.loops import every, forever
from dispatcher.metrics import Metrics
from dispatcher.pricing.numbers import default_resolver
from dispatcher.pricing.warmup import warm_up
from dispatcher.settings import Settings
from dispatcher.twilio.callbacks import StatusCallbacks
from dispatcher.twilio.lookup import TwilioLookup
from dispatcher.twilio.provider import build_twilio_client, credentials
from dispatcher.twilio.reconcile import Reconciler
from dispatcher.twilio.sender import TwilioSender

log = structlog.get_logger(__name__)

START_RABBITMQ_HINT = "start it with: rabbitmq-server -detached"
# Between reconnect rounds once every node refused (each round tries all of them at once).
RECONNECT_INTERVAL_SECONDS = 2.0


async def connect_broker(settings: Settings) -> AbstractRobustConnection:
    """A robust connection to the first node of ``DISPATCHER_AMQP_URL`` (one address, or a
    cluster's comma-separated) that answers; or a clear error saying how to start RabbitMQ."""
    try:
        async with asyncio.timeout(15):
            return await connect_robust(settings.amqp_url,
                                        reconnect_interval=RECONNECT_INTERVAL_SECONDS)
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPConnectionError) as exc:
        raise ServiceUnavailable(
            f"RabbitMQ is not reachable ({type(exc).__name__}); {START_RABBITMQ_HINT}") from exc


@dataclass
class Service:
    """Everything a running dispatcher holds, kept as strong references."""

    settings: Settings
    metrics: Metrics = field(default_factory=lambda: Metrics(CollectorRegistry()))
    pool: asyncpg.Pool | None = None
    # Staging's own connections: its batches never queue behind the handlers' round trips.
    staging_pool: asyncpg.Pool | None = None
    amqp: AbstractRobustConnection | None = None
    consumer: Consumer | None = None
    runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    twilio_client: object | None = None
    handler: JobHandler | None = None
    http_port: int | None = None
    stop: asyncio.Event | None = None
    # Set when a background task died of a bug: ``run`` then exits non-zero.
    failed: bool = False
    # What "now" is for scheduled sends and quiet hours (tests move it instead of sleeping).
    clock: Clock = utc_now

    async def start(self, stop: asyncio.Event) -> None:
        """Open everything; background tasks watch ``stop``."""
        self.stop = stop
        s = self.settings
        self.pool = await create_pool(s)
        self.amqp = await connect_broker(s)
        self.twilio_client = build_twilio_client(s)
        # Before any job runs: built beside a busy consumer, the warm-up thread's GIL share
        # slowed transactional jobs behind a backlog and its memory looked like growth.
        await warm_up(default_resolver(), stop, rest=0)
        jobs = JobStore(self.pool)
        rates = RateCache(self.pool)

        async def send_released(payload: bytes, attempt: int,
                                wanted: Callable[[], bool]) -> Outcome:
            return await handler.send_released(payload, attempt, wanted)
        # Broadcast fan-out: the runner sends through the handler, submissions wake the runner,
        # cancels stop its waiting sends.
        quiet_hours = QuietHoursAccounts(self.pool)
        runner = BroadcastRunner(self.pool, rates, send_released, quiet_hours=quiet_hours,
                                 clock=self.clock)
        broadcasts = Broadcasts(self.pool, rates, wake=runner.wake, canceled=runner.canceled,
                                quiet_hours=quiet_hours, clock=self.clock)
        handler = JobHandler(
            jobs, TwilioSender(self.twilio_client, s.twilio_timeout_seconds),
            rates, self._sender_limiter(), self.metrics,
            HandlerConfig(callback_base_url=s.public_base_url.rstrip("/"),
                          max_in_flight=s.max_in_flight,
                          reclaim_after_seconds=s.reconcile_grace_seconds / 4),
            broadcasts, SmartEncodingAccounts(self.pool), quiet_hours, self.clock)
        self.handler = handler
        pool = self.pool

        async def probe() -> None:
            await ping(pool)
        staging = None
        if s.fair_staging:
            self.staging_pool = await create_pool(s, min_size=1, max_size=3)
            staging = StagingArea(self.staging_pool, s.staging_lease_seconds)
        fairness = Fairness(self.metrics, share=s.fair_share_count, staging=staging,
                            scan_seconds=s.staging_scan_seconds)
        self.consumer = Consumer(self.amqp, Names(s.amqp_prefix), handler.handle, self.metrics,
                                 prefetch=s.prefetch, workers=s.worker_count,
                                 delivery_limit=s.delivery_limit, database=DatabaseWatch(probe),
                                 quorum_group_size=s.amqp_quorum_group_size,
                                 fairness=fairness)
        await self.consumer.start()
        topology = self.consumer.topology
        # LISTEN runs on connections of its own: pooled ones carry no session state (see db).
        async def listen_connect() -> asyncpg.Connection:
            return await connect(s.database_url)
        relay = OutboxRelay(self.pool, {"events": topology.events, "billing": topology.billing},
                            self.metrics, listen_connect=listen_connect)
        reconciler = Reconciler(self.pool, jobs, TwilioLookup(self.twilio_client), self.metrics,
                                grace=timedelta(seconds=s.reconcile_grace_seconds),
                                live=handler.working_on)
        # Every retry_wait job, whoever decided the retry, is sent by this sweeper when due.
        retries = RetrySweeper(self.pool, handler.send_released, self.metrics,
                               interval=s.retry_sweep_interval_seconds,
                               concurrency=s.max_in_flight)
        credits_channel = await self.amqp.channel()
        credits_queue = await declare_credits_queue(credits_channel, Names(s.amqp_prefix),
                                                    topology, s.amqp_quorum_group_size)
        await credits_queue.consume(
            CreditsListener(CreditStore(self.pool), topology, self.metrics).on_message)
        self.consumer.watch_channel("credits", credits_channel)
        resumer = Resumer(self.pool, handler.send_released, self.metrics,
                          listen_connect=listen_connect,
                          sweep_seconds=s.resume_sweep_interval_seconds)
        m = self.metrics
        # Scheduled sends and quiet hours: what came due is reserved and sent, once.
        releaser = Releaser(self.pool, handler.send_released, m, wake_broadcasts=runner.wake,
                            clock=self.clock)
        self._watch("releaser", every("releaser", s.release_sweep_interval_seconds,
                                      releaser.release_due, stop, m), stop)
        self._watch("resumer", forever("resumer", lambda: resumer.run(stop), stop, m), stop)
        self._watch("hold-sweeper", every(
            "hold_sweeper", s.hold_sweep_interval_seconds,
            lambda: sweep_holds(pool, m, s.hold_expiry_seconds), stop, m), stop)
        # Waiting jobs past their expires_at end failed/expired, whatever they wait for.
        expiry = ExpirySweeper(pool, m)
        self._watch("expiry-sweeper", every(
            "expiry_sweeper", s.expiry_sweep_interval_seconds, expiry.sweep, stop, m), stop)
        self._watch("outbox-relay", forever("outbox_relay", lambda: relay.run(stop), stop, m),
                    stop)
        self._watch("retry-sweeper", forever("retry_sweeper", lambda: retries.run(stop), stop, m),
                    stop)
        self._watch("broadcast-runner", forever("broadcast_runner", lambda: runner.run(stop),
                                                stop, m), stop)
        # A pass fails on the provider (down, errors) or on one job it cannot read; the next
        # pass tries again, and sending goes on meanwhile: a restart would not fix either.
        self._watch("reconciler", every("reconciler", s.reconcile_interval_seconds,
                                        reconciler.run_once, stop, m, transient=(Exception,)),
                    stop)
        sampler = CreditFlowSampler(pool, m)
        self._watch("credit-flow", forever(
            "credit_flow", lambda: sampler.run(s.metrics_interval_seconds, stop), stop, m), stop)
        callbacks = StatusCallbacks(jobs, credentials(s)[1],
                                    s.public_base_url, self.metrics)
        app = build_app(self.pool, self.metrics, callbacks, self.amqp,
                        self.consumer.consumers_attached)
        add_api_routes(app, self.pool, twilio_auth_token=credentials(s)[1],
                       public_base_url=s.public_base_url, broadcasts=broadcasts,
                       hold_expiry_seconds=s.hold_expiry_seconds)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, s.http_host, s.http_port)
        try:
            await site.start()
        except OSError as exc:
            raise PortUnavailable(
                f"cannot listen on {s.http_host}:{s.http_port} ({exc.strerror or exc}) — stop "
                "what uses it or set DISPATCHER_HTTP_PORT to a free port") from exc
        self.http_port = self.runner.addresses[0][1]
        log.info("dispatcher_started", http_port=self.http_port, prefix=s.amqp_prefix)

    def _sender_limiter(self) -> SenderLimiter:
        """Per-sender pacing: shared with every replica through PostgreSQL, or this process's."""
        s = self.settings
        if s.sender_rate_scope == "process":
            return SenderRateLimiter(s.sender_rate_per_second)
        assert self.pool is not None
        return SharedSenderRateLimiter(PostgresSlots(self.pool), s.sender_rate_per_second)

    def _watch(self, name: str, work: Awaitable[None], stop: asyncio.Event) -> None:
        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background_task_died", task=name)
                self.failed = True
                stop.set()
        self.tasks.append(asyncio.create_task(guarded(), name=name))

    async def close(self) -> None:
        """Drain, then close in reverse order of opening."""
        if self.stop is not None:
            self.stop.set()
        if self.consumer is not None:
            await self.consumer.stop(self.settings.shutdown_timeout_seconds)
        if self.tasks:
            # Background tasks see the stop event and finish the step they are in (a broadcast
            # batch being sent, held jobs being released), so no job is left `sending`.
            _, unfinished = await asyncio.wait(self.tasks,
                                               timeout=self.settings.shutdown_timeout_seconds)
            for task in unfinished:
                task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.runner is not None:
            await self.runner.cleanup()
        if self.twilio_client is not None:
            http_client = getattr(self.twilio_client, "http_client", None)
            close = getattr(http_client, "close", None)
            if close is not None:
                await close()
        if self.amqp is not None:
            await self.amqp.close()
        if self.staging_pool is not None:
            await self.staging_pool.close()
        if self.pool is not None:
            await self.pool.close()
        log.info("dispatcher_stopped",
                 **(self.handler.round_trips if self.handler is not None else {}))


async def run(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT (exit code 0), or until a background task dies of a bug (1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = Service(settings)
    try:
        await service.start(stop)
        await stop.wait()
        log.info("dispatcher_stopping")
    finally:
        await service.close()
    if service.failed:
        log.error("dispatcher_failed")
        return 1
    return 0
