"""``billing_client.amqp_writes``: frames written in one loop pass reach the broker in one write.

Against the shared broker: the writes the socket transport receives are counted, and what was
written is checked at the broker (every message acked exactly, every publish confirmed).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika

from billing_client.amqp import connect_robust
from billing_client.amqp_writes import CoalescingWriter

LIVE = "amqp://guest:guest@127.0.0.1:5672/"
MESSAGES = 200


def _count_transport_writes(connection: Any) -> list[int]:
    """Wrap the socket transport under aiormq's writer; the list grows by one per write."""
    writer = connection.kwargs["transport_factory"].writer
    assert isinstance(writer, CoalescingWriter)
    transport = writer.transport
    calls: list[int] = []
    write, writelines = transport.write, transport.writelines
    nested = False  # asyncio's writelines joins the buffers and calls write

    def counted_write(data: bytes) -> None:
        if not nested:
            calls.append(1)
        write(data)

    def counted_writelines(data: list[bytes]) -> None:
        nonlocal nested
        calls.append(len(data))
        nested = True
        try:
            writelines(data)
        finally:
            nested = False

    transport.write, transport.writelines = counted_write, counted_writelines
    return calls


async def test_acks_of_one_pass_go_out_in_one_write() -> None:
    connection = await connect_robust(LIVE, timeout=10)
    queue_name = f"test_amqp_writes_{uuid.uuid4().hex[:8]}"
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=MESSAGES)
        queue = await channel.declare_queue(queue_name, auto_delete=False)
        for i in range(MESSAGES):
            await channel.default_exchange.publish(aio_pika.Message(b"%d" % i),
                                                   routing_key=queue_name)
        delivered: list[aio_pika.abc.AbstractIncomingMessage] = []
        all_in = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            delivered.append(message)
            if len(delivered) == MESSAGES:
                all_in.set()

        tag = await queue.consume(on_message)
        await asyncio.wait_for(all_in.wait(), 10)
        calls = _count_transport_writes(connection)
        await asyncio.gather(*(message.ack() for message in delivered))
        await asyncio.sleep(0.2)  # the writer's pass
        # 200 ack frames, each once, in writes of up to aiormq's frame queue (10), not 200.
        assert sum(calls) == MESSAGES
        assert len(calls) <= MESSAGES // 5
        await queue.cancel(tag)
        await channel.close()

        # The broker saw every ack: nothing is left or redelivered on a fresh channel.
        check = await connection.channel()
        declared = await check.declare_queue(queue_name, passive=True)
        assert declared.declaration_result.message_count == 0
        await check.queue_delete(queue_name)
    finally:
        await connection.close()


async def test_publishes_are_confirmed_and_arrive_in_order() -> None:
    connection = await connect_robust(LIVE, timeout=10)
    queue_name = f"test_amqp_writes_{uuid.uuid4().hex[:8]}"
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, exclusive=True)
        await asyncio.gather(*(
            channel.default_exchange.publish(aio_pika.Message(b"%d" % i),
                                             routing_key=queue_name)
            for i in range(MESSAGES)))
        bodies = []
        for _ in range(MESSAGES):
            message = await queue.get(timeout=5)
            bodies.append(int(message.body))
            await message.ack()
        assert bodies == list(range(MESSAGES))
    finally:
        await connection.close()


async def test_close_sends_what_was_kept() -> None:
    """A publish written just before close still reaches the broker."""
    connection = await connect_robust(LIVE, timeout=10)
    queue_name = f"test_amqp_writes_{uuid.uuid4().hex[:8]}"
    channel = await connection.channel(publisher_confirms=False)
    await channel.declare_queue(queue_name)
    await channel.default_exchange.publish(aio_pika.Message(b"last"), routing_key=queue_name)
    await connection.close()

    other = await aio_pika.connect(LIVE)
    try:
        check = await other.channel()
        queue = await check.declare_queue(queue_name, passive=True)
        message = await queue.get(timeout=5)
        assert message.body == b"last"
        await message.ack()
        await check.queue_delete(queue_name)
    finally:
        await other.close()
