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

from bench.pipeline_raw import consume as raw_consume
from bench.pipeline_raw import run_and_print
from dispatcher.logs import configure_logging
from dispatcher.settings import Settings
from dispatcher.twilio.provider import build_twilio_client

TO, FROM = "+14155550100", "+14155550199"


async def consume(settings: Settings, queue_name: str, count: int,
                  prefetch: int) -> dict[str, float]:
    """The raw loop with one twilio create before each ack."""
    client = build_twilio_client(settings)

    async def create() -> None:
        await client.messages.create_async(to=TO, from_=FROM, body="floor",
                                           status_callback="http://127.0.0.1:9/cb")
    try:
        return await raw_consume(settings.amqp_url, queue_name, count, prefetch, create)
    finally:
        await client.http_client.close()


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
    run_and_print(consume(settings, args.queue, args.count, args.prefetch))


if __name__ == "__main__":
    main()
