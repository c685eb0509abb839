"""The floor under a broadcast on the fixed parts: one Twilio create a recipient, its callbacks.

``python -m bench.broadcast_floor --count N --window W --twilio-base-url URL ...`` makes N
``client.messages.create_async`` calls of the official ``twilio`` library (the dispatcher's own
HTTP client, at most W in flight, as the broadcast runner's window) and serves the status
callbacks the sandbox sends for them: each one is read and its signature checked
(``SignatureCheck``, one HMAC), then answered 204. Nothing else: no pre-flight, no database,
no reservation, no settlement, no events, no logs. A real broadcast does all of that on top, so
this rate bounds from above what the official library and a Twilio-shaped provider on the same
machine allow. Prints one JSON line: recipients/s until the last create was accepted (the
broadcast benchmark's definition), seconds until every callback arrived, CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

from aiohttp import web

from bench.pipeline_raw import cpu_seconds, run_and_print
from dispatcher.logs import configure_logging
from dispatcher.settings import Settings
from dispatcher.twilio.provider import build_twilio_client
from dispatcher.twilio.signatures import SignatureCheck, form_fields

TO, FROM = "+14155550100", "+14155550199"
CALLBACKS_PER_MESSAGE = 3  # queued, sent, delivered: what the sandbox sends for each create


async def run(settings: Settings, count: int, window: int, port: int) -> dict[str, float]:
    """Create ``count`` messages, ``window`` at a time, and take every callback they cause."""
    check = SignatureCheck(settings.twilio_auth_token, f"http://127.0.0.1:{port}")
    callbacks = 0
    all_called_back = asyncio.Event()

    async def callback(request: web.Request) -> web.Response:
        nonlocal callbacks
        if not check.valid_request(request, form_fields(await request.post())):
            return web.Response(status=403)
        callbacks += 1
        if callbacks >= count * CALLBACKS_PER_MESSAGE:
            all_called_back.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/twilio/status/{job_id}", callback)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    client = build_twilio_client(settings)
    slots = asyncio.Semaphore(window)

    async def create(i: int) -> None:
        async with slots:
            await client.messages.create_async(
                to=TO, from_=FROM, body="floor",
                status_callback=f"http://127.0.0.1:{port}/twilio/status/floor-{i}")

    cpu_before = cpu_seconds()
    started = time.perf_counter()
    await asyncio.gather(*(create(i) for i in range(count)))
    created = time.perf_counter() - started
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_called_back.wait(), timeout=120)
    called_back = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    await client.http_client.close()
    await runner.cleanup()
    return {"recipients": float(count), "created_s": created, "callbacks": float(callbacks),
            "called_back_s": called_back, "per_second": count / created, "cpu_seconds": cpu}


def main(argv: list[str] | None = None) -> None:
    """Entry point: one JSON report on stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.broadcast_floor")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--window", type=int, default=150)
    parser.add_argument("--port", type=int, required=True, help="where callbacks are served")
    parser.add_argument("--twilio-base-url", required=True)
    parser.add_argument("--account-sid", required=True)
    parser.add_argument("--auth-token", required=True)
    args = parser.parse_args(argv)
    configure_logging("json", "warning")
    settings = Settings(twilio_base_url=args.twilio_base_url,
                        twilio_account_sid=args.account_sid, twilio_auth_token=args.auth_token)
    run_and_print(run(settings, args.count, args.window, args.port))


if __name__ == "__main__":
    main()
