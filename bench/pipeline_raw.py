"""The broker ceiling: a bare aio-pika consume-and-ack loop, run as its own process.

``python -m bench.pipeline_raw --queue Q --count N --prefetch P`` consumes N messages from an
existing queue with the given prefetch, acks each one as it arrives (no ``multiple``), and prints
one JSON line: messages, seconds from the first delivery to the last ack, rate, and CPU seconds
from the first delivery on. It runs on uvloop when installed, the best case for any Python consumer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage


async def consume(amqp_url: str, queue_name: str, count: int, prefetch: int,
                  before_ack: Callable[[], Awaitable[None]] | None = None) -> dict[str, float]:
    """Consume and ack ``count`` messages (each after ``before_ack``, when given); time from
    the first delivery to the last ack."""
    connection = await aio_pika.connect(amqp_url)
    done = asyncio.Event()
    cpu_at_first = [0.0]  # start-up (imports, connecting) is not the loop's cost
    seen = 0
    first = last = 0.0
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name)

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal seen, first, last
            if not seen:
                first = time.perf_counter()
                cpu_at_first[:] = [cpu_seconds()]
            if before_ack is not None:
                await before_ack()
            await message.ack()
            seen += 1
            if seen >= count:
                last = time.perf_counter()
                done.set()

        await queue.consume(on_message)
        await done.wait()
    seconds = last - first
    return {"messages": float(seen), "seconds": seconds,
            "rate": (seen - 1) / seconds if seconds > 0 else 0.0,
            "cpu_seconds": cpu_seconds() - cpu_at_first[0]}


def cpu_seconds() -> float:
    """User + system CPU of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_and_print(work: Coroutine[Any, Any, dict[str, float]]) -> None:
    """Run ``work`` on uvloop (asyncio's loop without it) and print its report as one line."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        report = asyncio.run(work)
    else:
        report = uvloop.run(work)
    print(json.dumps(report))


def main(argv: list[str] | None = None) -> None:
    """Entry point: one JSON report on stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_raw")
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=200)
    args = parser.parse_args(argv)
    run_and_print(consume(args.amqp_url, args.queue, args.count, args.prefetch))


if __name__ == "__main__":
    main()
