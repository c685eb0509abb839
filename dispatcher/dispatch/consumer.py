"""The AMQP side of dispatching: consume, schedule transactional before bulk, ack by outcome.

Messages from both work queues go into one in-process priority queue served by a fixed number
of workers, so a bulk backlog can delay a transactional job by at most one job's handling time.
A handler that fails because PostgreSQL is unreachable keeps its message (unacked, so it is not
redelivered and burns no delivery) and waits for the database with backoff, then handles it
again; meanwhile this process reports no consumers (``/readyz`` false). Any other handler error
sends the job through a delayed retry queue; the failure that would reach the delivery limit
dead-letters it here instead, with reason ``delivery_limit`` and counted, rather than letting
the broker drop it there without a reason. Each delivery is acked on its own once its outcome
is committed; an ack or nack on a channel that died is logged, not raised: the broker
redelivers and the job id makes the redelivery harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import aio_pika
import aio_pika.exceptions
import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from dispatcher.dispatch.fairness import Fairness
from dispatcher.dispatch.outage import DatabaseWatch
from dispatcher.dispatch.staging import Delivery
from dispatcher.events.topology import PRIORITIES, Names, Topology, declare
from dispatcher.jobs.contract import Arrival, sniff_ids
from dispatcher.jobs.outcomes import DeadLetter, Done, Outcome, RetryLater
from dispatcher.loops import is_outage
from dispatcher.metrics import DEAD_LETTER_REASONS, Metrics

log = structlog.get_logger(__name__)

Handle = Callable[[bytes, Arrival], Awaitable[Outcome]]
PUBLISH_TIMEOUT_SECONDS = 10.0
# What acking or nacking on a closed channel or connection raises.
ACK_ERRORS = (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError,
              aio_pika.exceptions.ChannelInvalidStateError, ConnectionError, RuntimeError)
# Header counting this job's unexpected handler failures across delayed retries.
HANDLER_ERRORS_HEADER = "x-handler-errors"
# A handler failing again at once although the database answers is not waiting for an outage:
# after this many in-place attempts the failure goes the delayed-retry way.
IN_PLACE_ATTEMPTS = 3
# How often the consume channel is checked for having stayed closed after a reconnect.
CONSUME_CHECK_SECONDS = 2.5
# Deliveries beyond ``prefetch`` the broker may have outstanding while backlogs are staged:
# staged ones are acked within a batch, so this window is what keeps the queue draining.
STAGING_PREFETCH = 2000


class Consumer:
    """Consumes both work queues and turns each handler outcome into ack, retry or dead letter."""

    def __init__(self, connection: AbstractRobustConnection, names: Names, handle: Handle,
                 metrics: Metrics, *, prefetch: int, workers: int, delivery_limit: int,
                 database: DatabaseWatch | None = None, quorum_group_size: int = 0,
                 fairness: Fairness | None = None) -> None:
        self._connection = connection
        self._database = database or DatabaseWatch(None)
        self._names = names
        self._handle = handle
        self._metrics = metrics
        self._prefetch = prefetch
        self._workers = workers
        self._delivery_limit = delivery_limit
        self._quorum_group_size = quorum_group_size
        # The run queue: transactional first, accounts in turn (and backlogs staged, if on).
        self._fairness = fairness or Fairness(metrics, share=prefetch + workers)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._consumer_tags: dict[str, str] = {}
        self._consume_channel: AbstractChannel | None = None
        self._publish_channel: AbstractChannel | None = None
        # Channels of others on this connection (the credits listener's) watched like ours.
        self._watched: dict[str, AbstractChannel] = {}
        self._depth_channel: AbstractChannel | None = None
        self._topology: Topology | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False

    async def start(self) -> None:
        """Declare the topology and start consuming."""
        self._publish_channel = await self._connection.channel(publisher_confirms=True)
        self._topology = await declare(self._publish_channel, self._names, self._delivery_limit,
                                       self._quorum_group_size)
        self._tasks = [asyncio.create_task(self._work(), name=f"dispatch-worker-{i}")
                       for i in range(self._workers)]
        self._fairness.depth = self._bulk_depth
        self._tasks.append(asyncio.create_task(self._fairness.run(self._stop), name="fairness"))
        await self._consume()
        self._tasks.append(asyncio.create_task(self._keep_consuming(), name="consume-watch"))
        log.info("consumer_started", workers=self._workers, prefetch=self._prefetch)

    async def _consume(self) -> None:
        """Open the consume channel and attach to both work queues."""
        channel = self._consume_channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch + (
            STAGING_PREFETCH if self._fairness.staging else 0))
        for rank, priority in enumerate(PRIORITIES):
            queue = await channel.get_queue(self._names.work_queue(priority))
            self._consumer_tags[priority] = await queue.consume(self._enqueue_for(rank))
        self._metrics.consumers_attached.set(len(self._consumer_tags))

    def watch_channel(self, name: str, channel: AbstractChannel) -> None:
        """Reopen ``channel`` too if it stays closed while the connection is up."""
        self._watched[name] = channel

    async def _keep_consuming(self) -> None:
        """Re-attach when the broker is back but the consume channel is not: a robust
        connection restores itself, yet its channel may stay closed (a restore that failed
        while the restarted node's queues were not up). Waits a check or two so it never races
        the robust channel's own restore. The publish channel (the outbox relay's exchanges,
        retries, dead letters) and watched channels are reopened the same way."""
        closed_checks: dict[str, int] = {}
        while not self._stopping:
            await asyncio.sleep(CONSUME_CHECK_SECONDS)
            connected = not self._connection.is_closed and self._connection.connected.is_set()
            channels = {"consume": self._consume_channel, "publish": self._publish_channel,
                        **self._watched}
            for name, channel in channels.items():
                stuck = channel is not None and channel.is_closed and connected
                closed_checks[name] = closed_checks.get(name, 0) + 1 if stuck else 0
                if closed_checks[name] < 2 or self._stopping or channel is None:
                    continue
                try:
                    async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                        await (self._consume() if name == "consume" else channel.reopen())
                except (*ACK_ERRORS, TimeoutError) as exc:
                    log.warning("channel_reopen_failed", channel=name, error=type(exc).__name__)
                    continue
                closed_checks[name] = 0
                log.warning("channel_reopened", channel=name)

    async def _bulk_depth(self) -> int:
        """Messages ready in the bulk work queue, asked of the broker now (fair share's drain).

        On a channel of its own: a failed passive declare closes its channel.
        """
        channel = self._depth_channel
        if channel is None or channel.is_closed:
            channel = self._depth_channel = await self._connection.channel()
        # A robust channel answers a repeated passive declare from its cache: ask the broker.
        underlay = await channel.get_underlay_channel()
        async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
            declared = await underlay.queue_declare(self._names.work_queue("bulk"), passive=True)
        return int(declared.message_count or 0)

    @property
    def topology(self) -> Topology:
        """The declared exchanges and queues (after ``start``)."""
        assert self._topology is not None, "start() first"
        return self._topology

    def consumers_attached(self) -> int:
        """How many work queues this process is consuming right now."""
        channel = self._consume_channel
        if channel is None or channel.is_closed or self._stopping or self._database.down:
            return 0
        return len(self._consumer_tags)

    def _enqueue_for(self, rank: int) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def enqueue(message: AbstractIncomingMessage) -> None:
            self._fairness.offer(rank, message)
        return enqueue

    async def _requeue(self, message: Delivery) -> None:
        try:
            await message.nack(requeue=True)
        except ACK_ERRORS as exc:
            # The channel is gone (broker down): the broker redelivers it anyway. Raising here
            # would end the worker for good.
            log.warning("requeue_failed", message_id=message.message_id,
                        error=type(exc).__name__)

    async def _ack(self, message: Delivery) -> None:
        """Ack a delivery whose outcome is committed; a dead channel means the broker redelivers."""
        try:
            await message.ack()
        except ACK_ERRORS as exc:
            log.warning("ack_failed", message_id=message.message_id, error=type(exc).__name__)

    async def _work(self) -> None:
        while True:
            rank, account, delivered, message = await self._fairness.take()
            self._metrics.queue_wait_seconds.observe(time.monotonic() - delivered)
            if self._stopping:
                await self._requeue(message)
                self._fairness.finished(rank, account, message)
                continue
            self._in_flight += 1
            self._idle.clear()
            self._metrics.in_flight.set(self._in_flight)
            try:
                await self._process(message, PRIORITIES[rank])
            finally:
                self._fairness.finished(rank, account, message)
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()
                self._metrics.in_flight.set(self._in_flight)

    async def _process(self, message: Delivery, queue_priority: str) -> None:
        kind = message.type or "unknown"
        self._metrics.jobs.labels(kind=_kind_label(kind), outcome="consumed").inc()
        # Only a message published on the jobs exchange carries a routing key of the contract;
        # one back from a retry queue carries its work queue's name.
        published = message.exchange == self._names.jobs_exchange
        arrival = Arrival(message.routing_key if published else None,
                          "bulk" if queue_priority == "bulk" else "transactional")
        outcome = await self._handle_patiently(message, arrival)
        if outcome is None:
            await self._requeue(message)  # stopping while the database was away
            return
        try:
            await self._settle(message, outcome)
        except Exception:
            log.exception("job_settle_failed", message_id=message.message_id)
            await self._requeue(message)

    async def _handle_patiently(self, message: Delivery,
                                arrival: Arrival) -> Outcome | None:
        """The handler's outcome; through an outage, the same message again once it is over.

        None when the consumer stops while still waiting for the database.
        """
        quick_failures = 0
        while True:
            try:
                return await self._handle(message.body, arrival)
            except Exception as exc:
                if not is_outage(exc) or quick_failures >= IN_PLACE_ATTEMPTS:
                    return self._after_crash(message, exc)
                log.warning("job_waiting_for_database", message_id=message.message_id,
                            error=type(exc).__name__)
                self._metrics.handler_errors.labels(action="waited_for_database").inc()
                waited = await self._database.wait_until_up()
                if waited is None:
                    return None
                quick_failures = 0 if waited else quick_failures + 1

    def _after_crash(self, message: Delivery, exc: Exception) -> Outcome:
        """A delayed retry, or past the delivery limit a dead letter with its reason."""
        log.error("job_handler_crashed", message_id=message.message_id,
                  redelivered=message.redelivered, error=type(exc).__name__, exc_info=exc)
        errors = _int_header(message, HANDLER_ERRORS_HEADER) + 1
        # x-delivery-count: earlier deliveries of this message; the broker drops it without a
        # reason at the limit, so the failure that would lead there dead-letters it here.
        deliveries = _int_header(message, "x-delivery-count") + 1
        if max(errors, deliveries) >= self._delivery_limit:
            ids = sniff_ids(message.body)
            self._metrics.handler_errors.labels(action="dead_lettered").inc()
            return DeadLetter("delivery_limit",
                              f"handling failed {errors} time(s), delivered {deliveries} "
                              f"time(s); last error {type(exc).__name__}",
                              ids["job_id"], ids["account"])
        self._metrics.handler_errors.labels(action="retried").inc()
        return RetryLater(errors, "handler_error")

    async def _settle(self, message: Delivery, outcome: Outcome) -> None:
        if isinstance(outcome, Done):
            await self._ack(message)
            return
        assert self._topology is not None
        assert self._publish_channel is not None
        if isinstance(outcome, RetryLater):
            priority = _priority_of(message)
            delay = self._names.retry_delay(outcome.attempt)
            headers = {"x-retry-reason": outcome.reason}
            if outcome.reason == "handler_error":
                headers[HANDLER_ERRORS_HEADER] = str(outcome.attempt)
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                await self._publish_channel.default_exchange.publish(
                    _copy(message, headers),
                    routing_key=self._names.retry_queue(priority, delay))
            await self._ack(message)
            return
        await self._dead_letter(message, outcome)

    async def _dead_letter(self, message: Delivery, outcome: DeadLetter) -> None:
        assert self._topology is not None
        headers = {"x-reason": outcome.reason, "x-detail": outcome.detail[:500]}
        if outcome.job_id:
            headers["x-job-id"] = outcome.job_id
        if outcome.account_id:
            headers["x-account"] = outcome.account_id
        async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
            await self._topology.dead.publish(_copy(message, headers), routing_key=outcome.reason)
        await self._ack(message)
        self._metrics.dead_letters.labels(reason=_reason_label(outcome.reason)).inc()
        self._metrics.jobs.labels(kind=_kind_label(message.type or "unknown"),
                                  outcome="dead_lettered").inc()
        log.warning("job_dead_lettered", reason=outcome.reason, job_id=outcome.job_id,
                    account_id=outcome.account_id)

    async def stop(self, drain_timeout: float) -> None:
        """Stop consuming, hand back what was not started, let in-flight jobs finish.

        The log's ``unfinished`` counts the jobs still being handled when the drain timed out:
        each may be left ``sending`` for the reconciler.
        """
        self._stopping = True
        self._stop.set()
        self._database.give_up()
        if self._consume_channel is not None and not self._consume_channel.is_closed:
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                    for priority, tag in self._consumer_tags.items():
                        queue = await self._consume_channel.get_queue(
                            self._names.work_queue(priority))
                        await queue.cancel(tag)
            except (*ACK_ERRORS, TimeoutError) as exc:
                # The broker is away: nothing more will be delivered to this channel anyway.
                log.warning("consumer_cancel_failed", error=type(exc).__name__)
        self._metrics.consumers_attached.set(0)
        for message in self._fairness.waiting():
            await self._requeue(message)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        unfinished = self._in_flight  # before the cancelled workers count themselves out
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log_stop = log.warning if unfinished else log.info
        log_stop("consumer_stopped", unfinished=unfinished)
        for channel in (self._consume_channel, self._publish_channel, self._depth_channel):
            if channel is not None and not channel.is_closed:
                await channel.close()


def _int_header(message: Delivery, name: str) -> int:
    value = (message.headers or {}).get(name)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        return max(0, int(value)) if isinstance(value, int | str) else 0
    except ValueError:
        return 0


def _copy(message: Delivery, extra_headers: dict[str, str]) -> aio_pika.Message:
    headers = dict(message.headers or {})
    # The broker's count of this message's deliveries: a copy is a new message.
    headers.pop("x-delivery-count", None)
    headers.update(extra_headers)
    return aio_pika.Message(
        message.body, headers=headers, content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message.message_id,
        type=message.type, timestamp=message.timestamp)


def _priority_of(message: Delivery) -> str:
    # Either `<kind>.<priority>` from the jobs exchange, or the work queue's name after a retry.
    return "bulk" if (message.routing_key or "").endswith(".bulk") else "transactional"


KINDS = frozenset({"sms", "call", "broadcast"})


def _kind_label(kind: str) -> str:
    return kind if kind in KINDS else "unknown"


def _reason_label(reason: str) -> str:
    return reason if reason in DEAD_LETTER_REASONS else "handler_error"
