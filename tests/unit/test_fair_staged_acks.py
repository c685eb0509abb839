"""Staged deliveries are acked with one ``multiple`` ack below the lowest unsettled tag."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from dispatcher.dispatch.fairness import Fairness
from dispatcher.metrics import Metrics


@dataclass(eq=False)  # hashable by identity, as aiormq's channels
class Channel:
    acks: list[tuple[int, bool]] = field(default_factory=list)


@dataclass
class Message:
    channel: Channel
    delivery_tag: int
    body: bytes = b'{"id":"j","account":"a"}'

    async def ack(self, multiple: bool = False) -> None:
        self.channel.acks.append((self.delivery_tag, multiple))


def fairness() -> Fairness:
    return Fairness(Metrics(CollectorRegistry()), share=10)


def test_a_batch_with_nothing_unsettled_below_is_one_multiple_ack() -> None:
    channel, fair = Channel(), fairness()
    asyncio.run(fair._ack_staged([Message(channel, tag) for tag in (3, 4, 5, 6)]))
    assert channel.acks == [(6, True)]


def test_an_unsettled_delivery_bounds_the_multiple_ack() -> None:
    channel, fair = Channel(), fairness()
    held = Message(channel, 5)
    fair.offer(1, held)  # handed to the run queue, not settled
    asyncio.run(fair._ack_staged([Message(channel, tag) for tag in (2, 3, 4, 6, 7)]))
    assert channel.acks == [(4, True), (6, False), (7, False)]
    channel.acks.clear()
    fair.finished(1, "a", held)  # settled: no longer bounds anything
    asyncio.run(fair._ack_staged([Message(channel, tag) for tag in (8, 9)]))
    assert channel.acks == [(9, True)]


def test_channels_are_apart_and_a_single_delivery_is_acked_alone() -> None:
    old, new, fair = Channel(), Channel(), fairness()
    fair.offer(1, Message(old, 1))
    asyncio.run(fair._ack_staged([Message(old, 2), Message(old, 3), Message(new, 1)]))
    assert old.acks == [(2, False), (3, False)]
    assert new.acks == [(1, False)]
