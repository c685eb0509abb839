"""Fair share between accounts: who a worker serves next, and where a backlog waits.

Every delivery goes into a ``FairQueue`` (transactional lane first; accounts round-robin, by
weight, within a lane). An account may have ``share`` deliveries of a lane in this process
(waiting or being handled); past that it has a backlog, and its further deliveries of that
lane are staged in PostgreSQL (``staging``) and acked, so the broker keeps delivering what is
queued behind them. While an account is staged ("spilling"), every new delivery of it goes
the same way, so its order holds; the feeder claims its staged deliveries back, oldest
first, whenever its in-process count falls below the low-water mark, and the account leaves
the spilling state once a claim finds nothing more and nothing of it is on its way in.
Draining comes first: while more than a batch waits behind a staging account (at the broker,
asked every half second, or delivered and not staged yet), staged deliveries are not fed back,
so the process spends itself on reaching what is queued behind the backlog; the account's
share already in the process keeps sending meanwhile.

Nothing here touches the database while no account reaches its share: the uncontended path is
a deque push and pop.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import structlog

from dispatcher.dispatch.fair_queue import FairQueue
from dispatcher.dispatch.staging import Delivery, StagingArea, staged_row
from dispatcher.events.listener import DATABASE_ERRORS
from dispatcher.metrics import Metrics

log = structlog.get_logger(__name__)

_ACCOUNT = re.compile(rb'"account"\s*:\s*"([^"\\]{1,64})"')
_JOB_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,200})"')
STAGE_BATCH = 500
# How often the broker is asked how much is still queued behind the backlogs (one passive
# declare: per interval, not per job).
DEPTH_SECONDS = 0.1
BrokerDepth = Callable[[], Awaitable[int]]
RETRY_SECONDS = 1.0
Key = tuple[int, str]  # (lane, account)


class Fairness:
    """The consumer's run queue, with a PostgreSQL spill for accounts past their share."""

    def __init__(self, metrics: Metrics, *, share: int, staging: StagingArea | None = None,
                 scan_seconds: float = 5.0, weights_seconds: float = 30.0,
                 depth: BrokerDepth | None = None) -> None:
        self._metrics = metrics
        self._share = max(1, share)
        self._low_water = max(1, self._share - max(1, self._share // 4))
        self._staging = staging
        self._scan_seconds = scan_seconds
        self._weights_seconds = weights_seconds
        self._weights: dict[str, int] = {}
        # (when it entered the process, delivery)
        self.queue: FairQueue[tuple[float, Delivery]] = FairQueue(
            weight=lambda account: self._weights.get(account, 1))
        self._held: Counter[Key] = Counter()  # in this process: waiting or being handled
        self._spilling: set[Key] = set()
        self._to_stage: list[tuple[Key, str | None, Delivery]] = []
        self._on_the_way: Counter[Key] = Counter()  # being staged, not committed yet
        self._arrivals: Counter[Key] = Counter()  # staged arrivals, to see one during a claim
        # Spilling keys whose last claim came back short: no claim again until more of theirs
        # is committed (or a scan finds some), rather than one per finished job.
        self._exhausted: set[Key] = set()
        self._stage_wake = asyncio.Event()
        self._feed_wake = asyncio.Event()
        self._stopping = False
        # Delivery tags, by channel, of broker deliveries handed to the run queue and not
        # settled yet: a staged batch is acked with one ``multiple`` ack up to the lowest of
        # them (an ack per delivery cost the process and the broker more than the copy).
        self._unsettled: dict[object, set[int]] = {}
        self._tag_of: dict[int, tuple[object, int]] = {}  # id(delivery) -> its (channel, tag)
        self.depth = depth  # messages queued at the broker in the bulk lane (the consumer's)
        self._broker_backlog = 0

    @property
    def staging(self) -> bool:
        """True when backlogs are staged in PostgreSQL (else they only queue here)."""
        return self._staging is not None

    def offer(self, lane: int, message: Delivery) -> None:
        """A delivery from the broker: queue it here, or stage it if its account is past its
        share (or already staging) in this lane."""
        match = _ACCOUNT.search(message.body, 0, 65536)
        account = match.group(1).decode(errors="replace") if match else ""
        key = (lane, account)
        if self._staging is not None and account and (
                key in self._spilling or self._held[key] >= self._share):
            self._spilling.add(key)
            job = _JOB_ID.search(message.body, 0, 65536)
            self._to_stage.append((key, job.group(1).decode(errors="replace") if job else None,
                                   message))
            self._on_the_way[key] += 1
            self._arrivals[key] += 1
            self._stage_wake.set()
            return
        self._put(key, message)

    def _put(self, key: Key, message: Delivery) -> None:
        self._held[key] += 1
        tag = _tag(message)
        if tag is not None:
            self._unsettled.setdefault(tag[0], set()).add(tag[1])
            self._tag_of[id(message)] = tag
        self.queue.put_nowait(key[0], key[1], (time.monotonic(), message))

    async def take(self) -> tuple[int, str, float, Delivery]:
        """The next delivery to handle: (lane, account, when it came in, delivery)."""
        lane, account, (since, message) = await self.queue.get()
        return lane, account, since, message

    def finished(self, lane: int, account: str, message: Delivery | None = None) -> None:
        """A delivery taken with ``take`` is settled (acked, retried or handed back)."""
        # Its tag as taken in ``_put``: by then its channel may have closed.
        tag = self._tag_of.pop(id(message), None) if message is not None else None
        if tag is not None:
            tags = self._unsettled.get(tag[0])
            if tags is not None:
                tags.discard(tag[1])
                if not tags:
                    del self._unsettled[tag[0]]
        key = (lane, account)
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]
        if key in self._spilling and self._held[key] <= self._low_water:
            self._feed_wake.set()

    def waiting(self) -> list[Delivery]:
        """Everything not yet handed to a worker, taken out (stopping: to hand back)."""
        self._stopping = True
        left: list[Delivery] = []
        while not self.queue.empty():
            lane, account, (_, message) = self.queue.get_nowait()
            self.finished(lane, account, message)
            left.append(message)
        left.extend(message for *_, message in self._to_stage)
        self._to_stage.clear()
        return left

    async def run(self, stop: asyncio.Event) -> None:
        """Stage backlogs, feed them back in turn, keep claims alive (with staging only)."""
        if self._staging is None:
            return
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._stage_loop(stop, self._staging), name="fair-stage")
            tasks.create_task(self._feed_loop(stop, self._staging), name="fair-feed")
            tasks.create_task(self._upkeep_loop(stop, self._staging), name="fair-upkeep")
            if self.depth is not None:
                tasks.create_task(self._depth_loop(stop, self.depth), name="fair-depth")

    def _draining(self) -> bool:
        """True while an account is staging and more than a batch waits behind it: at the
        broker, or delivered and not staged yet."""
        if not self._spilling:
            return False
        return len(self._to_stage) >= STAGE_BATCH or self._broker_backlog > 0

    async def _depth_loop(self, stop: asyncio.Event, depth: BrokerDepth) -> None:
        """Keep ``_broker_backlog`` current while some account is staging."""
        while not stop.is_set():
            await _sleep(stop, DEPTH_SECONDS)
            if not self._spilling:
                self._broker_backlog = 0
                continue
            try:
                self._broker_backlog = await depth()
            except Exception as exc:  # a broker hiccup: feed as usual meanwhile
                log.warning("broker_depth_failed", error=type(exc).__name__)
                self._broker_backlog = 0
            if not self._broker_backlog:
                self._feed_wake.set()

    async def _stage_loop(self, stop: asyncio.Event, staging: StagingArea) -> None:
        while not stop.is_set():
            await _wait(self._stage_wake, stop)
            self._stage_wake.clear()
            while self._to_stage and not self._stopping:
                batch = self._to_stage[:STAGE_BATCH]
                try:
                    await staging.stage(staged_row(lane, account, job_id, message)
                                        for (lane, account), job_id, message in batch)
                except DATABASE_ERRORS as exc:
                    log.warning("staging_failed", jobs=len(batch), error=type(exc).__name__)
                    await _sleep(stop, RETRY_SECONDS)
                    continue
                if self._stopping:  # handed back by ``waiting``: the broker redelivers
                    return
                del self._to_stage[:len(batch)]
                for key, _, _ in batch:
                    self._exhausted.discard(key)
                    self._on_the_way[key] -= 1
                    if not self._on_the_way[key]:
                        del self._on_the_way[key]
                # The copies are committed: the broker's go (a lost ack only stages one twice).
                await self._ack_staged([message for _, _, message in batch])
                self._metrics.jobs_staged.inc(len(batch))
                self._feed_wake.set()

    async def _feed_loop(self, stop: asyncio.Event, staging: StagingArea) -> None:
        while not stop.is_set():
            await _wait(self._feed_wake, stop)
            self._feed_wake.clear()
            if self._draining():
                # Drain first: the broker has more queued behind the backlog (other accounts'
                # jobs among them). Feeding the backlog back now would spend the process on it;
                # the stage and depth loops wake this loop again.
                continue
            for key in sorted(self._spilling):
                if self._stopping:
                    return
                if self._held[key] > self._low_water or key in self._exhausted:
                    continue
                try:
                    await self._feed(key, staging)
                except DATABASE_ERRORS as exc:
                    log.warning("staged_claim_failed", error=type(exc).__name__)
                    await _sleep(stop, RETRY_SECONDS)
                    self._feed_wake.set()

    async def _feed(self, key: Key, staging: StagingArea) -> None:
        """Claim the account's next staged deliveries into the run queue; end its spilling
        when nothing is left in PostgreSQL nor on the way there."""
        lane, account = key
        arrivals, quiet = self._arrivals[key], not self._on_the_way[key]
        want = self._share - self._held[key]
        claimed = await staging.claim(account, lane, want)
        if self._stopping:
            await staging.release([d.seq for d in claimed])
            return
        for delivery in claimed:
            self._put(key, delivery)
        self._metrics.jobs_unstaged.inc(len(claimed))
        if len(claimed) < want:
            if quiet and self._arrivals[key] == arrivals:
                self._spilling.discard(key)
                self._arrivals.pop(key, None)
            else:
                self._exhausted.add(key)

    async def _upkeep_loop(self, stop: asyncio.Event, staging: StagingArea) -> None:
        """Renew claims; take up staged work nobody holds (a crash, another replica's
        backlog); refresh the weights."""
        since_weights = self._weights_seconds
        while not stop.is_set():
            try:
                await staging.renew()
                for lane, account in await staging.waiting():
                    self._spilling.add((lane, account))
                    self._exhausted.discard((lane, account))
                    self._feed_wake.set()
                if since_weights >= self._weights_seconds:
                    self._weights = await staging.weights()
                    since_weights = 0.0
            except DATABASE_ERRORS as exc:
                log.warning("staging_upkeep_failed", error=type(exc).__name__)
            pause = min(self._scan_seconds, staging.lease_seconds / 3)
            await _sleep(stop, pause)
            since_weights += pause


    async def _ack_staged(self, messages: list[Delivery]) -> None:
        """Ack staged deliveries: per channel, one ``multiple`` ack covers every one below
        the lowest delivery tag still unsettled in this process (nothing else of that
        channel below it is unacked: deliveries reach ``offer`` in tag order, and the ones
        after the batch are later still); the rest one by one. Decided before any await."""
        singles: list[Delivery] = []
        by_channel: dict[object, list[tuple[int, Delivery]]] = {}
        for message in messages:
            tag = _tag(message)
            if tag is None:
                singles.append(message)
            else:
                by_channel.setdefault(tag[0], []).append((tag[1], message))
        multiples: list[Delivery] = []
        for channel, tagged in by_channel.items():
            tagged.sort(key=lambda item: item[0])
            unsettled = self._unsettled.get(channel)
            floor = min(unsettled) if unsettled else None
            covered = len(tagged) if floor is None else sum(1 for t, _ in tagged if t < floor)
            if covered >= 2:
                multiples.append(tagged[covered - 1][1])
            else:
                covered = 0
            singles.extend(message for _, message in tagged[covered:])
        # All at once: acked one by one, each ack's await would yield to every worker.
        await asyncio.gather(*(_ack(message, multiple=True) for message in multiples),
                             *(_ack(message) for message in singles))


def _tag(message: Delivery) -> tuple[object, int] | None:
    """(channel, delivery tag) of a broker delivery on an open channel; None otherwise (a
    staged delivery, or a channel that closed: no ack of it reaches the broker anyway)."""
    tag = getattr(message, "delivery_tag", None)
    if not isinstance(tag, int):
        return None
    try:
        channel = message.channel  # type: ignore[attr-defined]
    except Exception:  # aio-pika raises on a closed channel
        return None
    return channel, tag


async def _ack(message: Delivery, multiple: bool = False) -> None:
    """Ack a staged delivery; a dead channel means the broker redelivers it (staged twice)."""
    try:
        await message.ack(multiple=multiple)
    except Exception as exc:  # the consumer's ACK_ERRORS, without importing the consumer
        log.warning("staged_ack_failed", error=type(exc).__name__)


async def _wait(event: asyncio.Event, stop: asyncio.Event) -> None:
    """Until ``event`` or ``stop`` is set."""
    if event.is_set() or stop.is_set():
        return
    waiters = [asyncio.create_task(event.wait()), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
