"""``python -m billing_client.reference``: run the service, set payment methods, list invoices,
set the recharge safety limits, turn auto-recharge back on, and audit."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

import structlog

from billing_client.reference.admin import (
    enable_auto_recharge,
    list_invoices,
    recharge_status,
    set_payment_methods,
    set_recharge_limits,
)
from billing_client.reference.audit import run_checks
from billing_client.reference.errors import BillingServiceError
from billing_client.reference.service import ReferenceBillingService, open_pool
from billing_client.reference.settings import BillingSettings
from billing_client.reference.store import PURPOSES

log = structlog.get_logger(__name__)

NEEDS = (
    "needs: PostgreSQL at BILLING_DATABASE_URL (default the dispatcher's database,\n"
    "       postgresql://postgres@127.0.0.1:5432/dispatcher; its own tables, created at start)\n"
    "       RabbitMQ at BILLING_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/), the\n"
    "       exchange BILLING_AMQP_PREFIX.billing (default dispatcher.billing) shared with\n"
    "       the dispatcher (set it to the dispatcher's DISPATCHER_AMQP_PREFIX)\n"
    "       BILLING_DEFAULT_PRIMARY / BILLING_DEFAULT_BACKUP: payment tokens of the fake\n"
    "       gateway (tok_ok, tok_decline, ...) for accounts without their own methods\n"
    "listens: on no port; every setting: BILLING_* (billing_client/reference/README.md)")


def configure_logging(fmt: str, level: str) -> None:
    """structlog to stderr: JSON (``fmt='json'``) or readable console lines."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))


async def run(settings: BillingSettings) -> int:
    """Run until SIGTERM/SIGINT (or a dead background task), then stop gracefully."""
    service = ReferenceBillingService(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    await service.start()
    try:
        await service.wait()
    finally:
        log.info("billing_service_stopping")
        await service.stop()
    return 0


async def methods_set(args: argparse.Namespace, settings: BillingSettings) -> int:
    """Register payment methods; tokens are never echoed."""
    await set_payment_methods(settings, args.account, primary=args.primary, backup=args.backup,
                              remove_backup=args.no_backup, purpose=args.purpose)
    roles = "primary" + (", backup" if args.backup else "")
    sys.stdout.write(f"set {roles} for {args.account} ({args.purpose})\n")
    return 0


async def invoices(args: argparse.Namespace, settings: BillingSettings) -> int:
    """Print the account's invoices as JSON lines."""
    for row in await list_invoices(settings, args.account):
        sys.stdout.write(json.dumps(row, default=_jsonable) + "\n")
    return 0


async def recharge(args: argparse.Namespace, settings: BillingSettings) -> int:
    """``recharge limits|enable|show``: the owner's recharge safety settings."""
    if args.recharge_command == "limits":
        verdict = await set_recharge_limits(
            settings, args.account, monthly_cap=args.monthly_cap, cap_unit=args.cap_unit,
            hourly_limit=args.hourly_limit, decline_limit=args.decline_limit,
            clear_cap=args.no_cap)
        sys.stdout.write(f"limits set for {args.account} ({verdict.decision})\n")
    elif args.recharge_command == "enable":
        verdict = await enable_auto_recharge(settings, args.account)
        sys.stdout.write(f"auto-recharge on for {args.account} ({verdict.decision})\n")
    else:
        shown = await recharge_status(settings, args.account)
        sys.stdout.write(json.dumps(shown, default=_jsonable) + "\n")
    return 0


async def audit(settings: BillingSettings) -> int:
    """Print each violated rule; exit 1 if there is any."""
    pool = await open_pool(settings)
    try:
        found = await run_checks(pool)
    finally:
        await pool.close()
    for v in found:
        sys.stdout.write(f"{v.check}\t{v.account}\t{v.problem}\n")
    sys.stdout.write(f"{len(found)} problem(s)\n")
    return 1 if found else 0


def _jsonable(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``run`` (default), ``methods set``, ``invoices``."""
    parser = argparse.ArgumentParser(prog="python -m billing_client.reference",
                                     description="Reference billing service (auto top-up).",
                                     epilog=NEEDS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="consume balance events and top up (default)",
                        epilog=NEEDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = commands.add_parser("methods", help="payment methods", epilog=NEEDS,
                                  formatter_class=argparse.RawDescriptionHelpFormatter
                                  ).add_subparsers(
        dest="methods_command", required=True)
    set_ = methods.add_parser("set", help="register an account's payment methods", epilog=NEEDS,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    set_.add_argument("account")
    set_.add_argument("--primary", required=True, help="gateway token of the primary method")
    backup = set_.add_mutually_exclusive_group()
    backup.add_argument("--backup", help="gateway token of the backup method")
    backup.add_argument("--no-backup", action="store_true", help="remove the backup method")
    set_.add_argument("--purpose", choices=PURPOSES, default="auto_recharge")
    show = commands.add_parser("invoices", help="list an account's invoices (JSON lines)",
                               epilog=NEEDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("account")
    _recharge_parser(commands)
    commands.add_parser("audit", help="check that no charge broke a safety rule, no duplicate "
                        "grant (exit 1 if any)", epilog=NEEDS,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def _recharge_parser(commands: Any) -> None:
    """``recharge limits|enable|show`` (owner actions; the CLI is the operator's tool)."""
    sub = commands.add_parser("recharge", help="recharge safety limits, turn auto-recharge on",
                              epilog=NEEDS, formatter_class=argparse.RawDescriptionHelpFormatter
                              ).add_subparsers(dest="recharge_command", required=True)
    limits = sub.add_parser("limits", help="set an account's recharge limits")
    limits.add_argument("account")
    cap = limits.add_mutually_exclusive_group()
    cap.add_argument("--monthly-cap", type=int, help="most charged per calendar month (UTC)")
    cap.add_argument("--no-cap", action="store_true", help="remove the monthly cap")
    limits.add_argument("--cap-unit", choices=("credits", "money"))
    limits.add_argument("--hourly-limit", type=int, help="most charges in any hour")
    limits.add_argument("--decline-limit", type=int,
                        help="declined charges in a row before auto-recharge pauses")
    for name, text in (("enable", "turn auto-recharge back on (charges at once if still low)"),
                       ("show", "show the account's limits and state (JSON)")):
        sub.add_parser(name, help=text).add_argument("account")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = BillingSettings.from_env()
        configure_logging(settings.log_format, settings.log_level)
        if args.command == "methods":
            return asyncio.run(methods_set(args, settings))
        if args.command == "invoices":
            return asyncio.run(invoices(args, settings))
        if args.command == "recharge":
            return asyncio.run(recharge(args, settings))
        if args.command == "audit":
            return asyncio.run(audit(settings))
        return asyncio.run(run(settings))
    except BillingServiceError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
