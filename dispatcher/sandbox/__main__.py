"""Run the sandbox standalone: ``python -m dispatcher.sandbox --port 8765``."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import structlog

from dispatcher.logs import configure_logging
from dispatcher.sandbox.app import SandboxServer
from dispatcher.sandbox.state import Scenario
from dispatcher.settings import InvalidSetting, Settings

log = structlog.get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; credentials default to DISPATCHER_TWILIO_* settings."""
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher.sandbox", description="Twilio-compatible sandbox server",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
            "credentials: DISPATCHER_TWILIO_ACCOUNT_SID and DISPATCHER_TWILIO_AUTH_TOKEN (the\n"
            "  ones the dispatcher sends with; --account-sid / --auth-token override them)\n"
            "point the dispatcher at it: DISPATCHER_TWILIO_BASE_URL=http://HOST:PORT\n"
            "logs: DISPATCHER_LOG_FORMAT (console|json), DISPATCHER_LOG_LEVEL"))
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="default: 8765")
    parser.add_argument("--account-sid", default=None,
                        help="default: DISPATCHER_TWILIO_ACCOUNT_SID, else a random AC… SID")
    parser.add_argument("--auth-token", default=None,
                        help="default: DISPATCHER_TWILIO_AUTH_TOKEN, else a random token")
    parser.add_argument("--scenario", type=Path, default=None, help="scenario JSON file")
    parser.add_argument("--callback-workers", type=int, default=8)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM."""
    scenario = None
    if args.scenario is not None:
        scenario = Scenario.from_json(json.loads(args.scenario.read_text()))
    server = SandboxServer(
        account_sid=args.account_sid or settings.twilio_account_sid or None,
        auth_token=args.auth_token or settings.twilio_auth_token or None,
        scenario=scenario, callback_workers=args.callback_workers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start(args.host, args.port)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    """Entry point; a bad setting or a port in use ends it with one line and exit code 2."""
    args = parse_args(argv)
    try:
        settings = Settings.from_env()
    except InvalidSetting as exc:
        _fail(f"error [invalid_setting]: {exc}")
    configure_logging(settings.log_format, settings.log_level)
    try:
        with asyncio.Runner(loop_factory=_fast_loop()) as runner:
            runner.run(serve(args, settings))
    except OSError as exc:
        _fail(f"error: cannot listen on {args.host}:{args.port} ({exc.strerror})"
              " — pick another --port")


def _fail(line: str) -> NoReturn:
    """One line on stderr and exit code 2, the way the ``dispatcher`` command fails."""
    print(line, file=sys.stderr)
    raise SystemExit(2)


def _fast_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (as ``dispatcher run`` uses), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    main()
