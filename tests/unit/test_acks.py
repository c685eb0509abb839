"""Coalesced acks never acknowledge a delivery whose outcome is not committed."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import cast

import pytest
from aio_pika.abc import AbstractIncomingMessage

from dispatcher.dispatch.acks import AckCoalescer


@dataclass(eq=False)
class Broker:
    """One channel as RabbitMQ sees it: outstanding tags, and which of them may be acked."""

    outstanding: set[int] = field(default_factory=set)
    committed: set[int] = field(default_factory=set)
    frames: list[tuple[int, bool]] = field(default_factory=list)
    is_closed: bool = False

    def deliver(self, tag: int) -> Message:
        self.outstanding.add(tag)
        return Message(self, tag)

    def ack(self, tag: int, multiple: bool) -> None:
        self.frames.append((tag, multiple))
        assert tag in self.outstanding, f"unknown delivery tag {tag}"  # a channel error
        covered = {t for t in self.outstanding if t <= tag} if multiple else {tag}
        assert covered <= self.committed, f"acked before commit: {covered - self.committed}"
        self.outstanding -= covered

    def nack(self, tag: int) -> None:
        assert tag in self.outstanding
        self.outstanding.discard(tag)


@dataclass(eq=False)
class Message:
    channel: Broker
    delivery_tag: int
    message_id: str = "m"

    async def ack(self, multiple: bool = False) -> None:
        self.channel.ack(self.delivery_tag, multiple)


def as_incoming(message: Message) -> AbstractIncomingMessage:
    return cast(AbstractIncomingMessage, message)


def commit(broker: Broker, acks: AckCoalescer, message: Message) -> None:
    broker.committed.add(message.delivery_tag)
    acks.ack(as_incoming(message))


async def settle_loop() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_run_settled_together_is_one_multiple_ack() -> None:
    broker, acks = Broker(), AckCoalescer()
    messages = [broker.deliver(tag) for tag in range(1, 51)]
    for message in reversed(messages):
        commit(broker, acks, message)
    await settle_loop()
    assert broker.frames == [(50, True)]
    assert not broker.outstanding
    await acks.close()


async def test_nothing_above_an_unsettled_delivery_is_covered() -> None:
    broker, acks = Broker(), AckCoalescer(hold_seconds=60, hold_limit=100)
    first, second, third = (broker.deliver(tag) for tag in (1, 2, 3))
    commit(broker, acks, second)
    commit(broker, acks, third)
    await settle_loop()
    assert broker.frames == []  # held: tag 1 is still in flight
    commit(broker, acks, first)
    await settle_loop()
    assert broker.frames == [(3, True)]
    await acks.close()


async def test_held_acks_go_out_alone_after_the_hold() -> None:
    broker, acks = Broker(), AckCoalescer(hold_seconds=0.01)
    first, second = broker.deliver(1), broker.deliver(2)
    commit(broker, acks, second)
    await asyncio.sleep(0.05)
    assert broker.frames == [(2, False)]
    commit(broker, acks, first)
    await settle_loop()
    assert broker.frames == [(2, False), (1, True)]
    await acks.close()


async def test_a_run_passes_over_nacked_deliveries() -> None:
    broker, acks = Broker(), AckCoalescer()
    messages = [broker.deliver(tag) for tag in (1, 2, 3)]
    broker.nack(2)
    acks.nacked(as_incoming(messages[1]))
    commit(broker, acks, messages[0])
    commit(broker, acks, messages[2])
    await settle_loop()
    assert broker.frames == [(3, True)]
    assert not broker.outstanding
    await acks.close()


async def test_close_acks_everything_committed_and_nothing_else() -> None:
    broker, acks = Broker(), AckCoalescer(hold_seconds=60, hold_limit=100)
    messages = [broker.deliver(tag) for tag in range(1, 6)]
    for message in messages[1:]:
        commit(broker, acks, message)
    await acks.close()
    assert broker.outstanding == {1}  # never committed: left for the broker to redeliver


@pytest.mark.parametrize("seed", range(30))
async def test_random_interleavings_keep_ack_after_commit(seed: int) -> None:
    rng = random.Random(seed)
    broker = Broker()
    acks = AckCoalescer(hold_seconds=rng.choice([0.0, 0.001, 60.0]),
                        hold_limit=rng.choice([1, 5, 1000]))
    messages = [broker.deliver(tag) for tag in range(1, 201)]
    rng.shuffle(messages)
    nacked: set[int] = set()
    for message in messages:
        if rng.random() < 0.1:
            broker.nack(message.delivery_tag)
            acks.nacked(as_incoming(message))
            nacked.add(message.delivery_tag)
        else:
            commit(broker, acks, message)
        if rng.random() < 0.3:
            await asyncio.sleep(rng.choice([0, 0, 0.002]))
    await acks.close()
    assert not broker.outstanding
    assert len(broker.frames) <= 200 - len(nacked)


async def test_a_closed_channel_is_forgotten() -> None:
    broker, acks = Broker(), AckCoalescer(hold_seconds=60, hold_limit=100)
    commit(broker, acks, broker.deliver(2))
    await settle_loop()
    broker.is_closed = True  # the broker redelivers its unacked messages on another channel
    other = Broker()
    commit(other, acks, other.deliver(1))
    await acks.close()
    assert broker.frames == []
    assert other.frames == [(1, True)]
