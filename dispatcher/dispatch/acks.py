"""Coalesced acks: one ``basic.ack multiple`` frame for a run of settled deliveries.

A multiple ack acknowledges every outstanding delivery up to its tag, so it may only cover tags
whose outcome is committed. Delivery tags on a channel are consecutive integers, so a run is the
consecutive tags from the lowest unresolved one that are all settled (or were nacked on their
own, which the broker has already forgotten). A settled delivery above a gap — a job still in
flight below it — is held briefly and then acked on its own, so a slow job never holds more than
a few finished ones in the prefetch window. Every frame goes out from one task, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import aio_pika.exceptions
import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractIncomingMessage

log = structlog.get_logger(__name__)
CLOSE_SECONDS = 10.0

ACK_ERRORS = (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError,
              aio_pika.exceptions.ChannelInvalidStateError, ConnectionError, RuntimeError)


@dataclass
class _Window:
    """The unresolved deliveries of one channel."""

    next_tag: int = 1  # the lowest tag not yet acked or nacked
    settled: dict[int, AbstractIncomingMessage] = field(default_factory=dict)
    resolved: set[int] = field(default_factory=set)  # acked or nacked on their own
    held_since: float | None = None


class AckCoalescer:
    """Acks settled deliveries: multiple-acks for consecutive runs, single acks past a gap."""

    def __init__(self, *, hold_seconds: float = 0.01, hold_limit: int = 25) -> None:
        self._hold_seconds = hold_seconds
        self._hold_limit = max(1, hold_limit)
        self._windows: dict[object, _Window] = {}
        self._sender: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._alone: list[AbstractIncomingMessage] = []
        self._closing = False
        self.frames = 0  # ack frames sent (for tests and the benchmark's curiosity)

    def ack(self, message: AbstractIncomingMessage) -> None:
        """The message's outcome is committed: ack it soon (never before that)."""
        tag = message.delivery_tag
        window = self._window_of(message)
        if window is None or tag is None or tag < window.next_tag:
            self._alone.append(message)
        else:
            window.settled[tag] = message
        self._kick()

    def nacked(self, message: AbstractIncomingMessage) -> None:
        """The message was nacked (or rejected) on its own: a later run may pass over it."""
        tag = message.delivery_tag
        window = self._window_of(message)
        if window is not None and tag is not None and tag >= window.next_tag:
            window.resolved.add(tag)
            self._kick()

    async def close(self) -> None:
        """Send every ack still owed (held ones included), then let the sender finish."""
        self._closing = True
        self._hold_seconds = 0.0
        self._kick()
        sender = self._sender
        if sender is not None:
            try:
                await asyncio.wait_for(asyncio.shield(sender), CLOSE_SECONDS)
            except TimeoutError:
                sender.cancel()
                log.warning("acks_unsent_at_close")
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _window_of(self, message: AbstractIncomingMessage) -> _Window | None:
        try:
            channel = message.channel
        except aio_pika.exceptions.ChannelInvalidStateError:
            return None  # the channel is gone: the broker redelivers, nothing to ack
        window = self._windows.get(channel)
        if window is None:
            window = self._windows[channel] = _Window()
        return window

    def _owed(self) -> bool:
        return bool(self._alone) or any(w.settled for w in self._windows.values())

    def _kick(self) -> None:
        self._wakeup.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_forever(), name="ack-coalescer")

    async def _send_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Let every worker woken in this loop iteration settle first, then ack them together.
            await asyncio.sleep(0)
            for message, multiple in self._plan():
                await self._send(message, multiple)
            if self._closing and not self._owed():
                return

    def _plan(self) -> list[tuple[AbstractIncomingMessage, bool]]:
        """What to send now, in order; the windows already reflect it when this returns."""
        plan: list[tuple[AbstractIncomingMessage, bool]] = [(m, False) for m in self._alone]
        self._alone = []
        now = asyncio.get_running_loop().time()
        for channel, window in list(self._windows.items()):
            if getattr(channel, "is_closed", False):
                del self._windows[channel]
                continue
            last: AbstractIncomingMessage | None = None
            while window.next_tag in window.settled or window.next_tag in window.resolved:
                last = window.settled.pop(window.next_tag, last)
                window.resolved.discard(window.next_tag)
                window.next_tag += 1
            if last is not None:
                plan.append((last, True))
            plan.extend(self._release_held(window, now))
        return plan

    def _release_held(self, window: _Window, now: float) -> list[tuple[AbstractIncomingMessage,
                                                                      bool]]:
        """Settled deliveries above a gap: single acks once held too long or too many."""
        if not window.settled:
            window.held_since = None
            return []
        if window.held_since is None:
            window.held_since = now
        if (len(window.settled) < self._hold_limit
                and now - window.held_since < self._hold_seconds):
            self._remind_at(window.held_since + self._hold_seconds)
            return []
        held = sorted(window.settled.items())
        window.settled.clear()
        window.resolved.update(tag for tag, _ in held)
        window.held_since = None
        return [(message, False) for _, message in held]

    def _remind_at(self, when: float) -> None:
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._reminded)

    def _reminded(self) -> None:
        self._timer = None
        self._wakeup.set()

    async def _send(self, message: AbstractIncomingMessage, multiple: bool) -> None:
        self.frames += 1
        try:
            await message.ack(multiple=multiple)
        except ACK_ERRORS as exc:
            # The channel closed: the broker redelivers, and the job id makes that harmless.
            log.warning("ack_failed", message_id=message.message_id, error=type(exc).__name__)
