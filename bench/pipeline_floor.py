"""The floor under any dispatcher built on the fixed parts: consume, one Twilio create, ack.

``python -m bench.pipeline_floor --queue Q --count N --prefetch P --twilio-base-url URL ...``
consumes N messages like ``bench.pipeline_raw`` and, for each, makes the one provider call a
dispatcher cannot skip — ``client.messages.create_async`` of the official ``twilio`` library,
through the dispatcher's own HTTP client, to the sandbox — and then acks it. Nothing else: no
validation, no pricing, no database, no logs, no metrics. Whatever a real dispatcher does on
top can only make it slower, so this rate bounds from above what the fixed choices (aio-pika,
the twilio library, the sandbox on the same machine) allow. Prints one JSON line like the raw
loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from dispatcher.logs import configure_logging
from dispatcher.provider import build_twilio_client
from dispatcher.settings import Settings

TO, FROM = "+14155550100", "+14155550199"


async def consume(settings: Settings, queue_name: str, count: int,
                  prefetch: int) -> dict[str, float]:
    """Consume, create and ack ``count`` messages; time from the first delivery to the last ack."""
    client = build_twilio_client(settings)
    connection = await aio_pika.connect(settings.amqp_url)
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
                cpu_at_first[:] = [_cpu_seconds()]
            await client.messages.create_async(to=TO, from_=FROM, body="floor",
                                               status_callback="http://127.0.0.1:9/cb")
            await message.ack()
            seen += 1
            if seen >= count:
                last = time.perf_counter()
                done.set()

        await queue.consume(on_message)
        await done.wait()
    await client.http_client.close()
    seconds = last - first
    return {"messages": float(seen), "seconds": seconds,
            "rate": (seen - 1) / seconds if seconds > 0 else 0.0,
            "cpu_seconds": _cpu_seconds() - cpu_at_first[0]}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    """Entry point: one JSON report on stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_floor")
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=200)
    parser.add_argument("--twilio-base-url", required=True)
    parser.add_argument("--account-sid", required=True)
    parser.add_argument("--auth-token", required=True)
    args = parser.parse_args(argv)
    configure_logging("json", "warning")  # as quiet as the dispatcher at its `info` level
    settings = Settings(amqp_url=args.amqp_url, twilio_base_url=args.twilio_base_url,
                        twilio_account_sid=args.account_sid, twilio_auth_token=args.auth_token)
    work = consume(settings, args.queue, args.count, args.prefetch)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        report = asyncio.run(work)
    else:
        report = uvloop.run(work)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
