"""The ``dispatcher`` command line: one small async function per subcommand."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import asyncpg

from dispatcher.credits.audit import cross_check_billing, format_report, run_audit
from dispatcher.credits.guards import GuardSettings, load_guards, release_velocity, set_guards
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import (
    CADENCES,
    Plan,
    check_auto_recharge,
    create_account,
    renew_due,
)
from dispatcher.db import connect, require_migrated
from dispatcher.demo.options import DemoOptions
from dispatcher.errors import DispatcherError
from dispatcher.logs import configure_logging
from dispatcher.migrate import migrate
from dispatcher.pricing.quiet_hours import parse_clock
from dispatcher.queries import q
from dispatcher.settings import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, InvalidSetting, Settings

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


async def _with_pool(settings: Settings, work: Callable[[asyncpg.Pool], Awaitable[int]]) -> int:
    from dispatcher.db import create_pool

    pool = await create_pool(settings, min_size=1, max_size=2)
    try:
        await require_migrated(pool)
        return await work(pool)
    finally:
        await pool.close()


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    conn = await connect(settings.database_url)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


async def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        violations = await run_audit(pool)
        if args.billing_dsn:
            billing = await connect(args.billing_dsn)
            try:
                violations += await cross_check_billing(pool, billing)
            finally:
                await billing.close()
        accounts = await pool.fetchval("SELECT count(*) FROM accounts")
        print(format_report(violations, accounts))
        return 1 if violations else 0
    return await _with_pool(settings, work)


async def cmd_accounts_create(args: argparse.Namespace, settings: Settings) -> int:
    plan = Plan(args.allocation, args.cadence, args.renewal_day)

    async def work(pool: asyncpg.Pool) -> int:
        await create_account(pool, args.account, name=args.name, plan=plan,
                             auto_recharge=(args.auto_recharge_threshold is not None,
                                            args.auto_recharge_threshold or 0,
                                            args.auto_recharge_amount or 0))
        print(f"created account {args.account}")
        return 0
    return await _with_pool(settings, work)


async def cmd_accounts_auto_recharge(args: argparse.Namespace, settings: Settings) -> int:
    """Set auto-recharge; refused (naming the fields) when the amount cannot lift a balance
    at zero above the threshold."""
    enabled = args.state == "on"
    check_auto_recharge(enabled, args.threshold, args.amount)

    async def work(pool: asyncpg.Pool) -> int:
        row = await pool.fetchrow(q("api_set_auto_recharge"), args.account, enabled,
                                  args.threshold, args.amount, args.topup_at_zero)
        if row is None:
            raise DispatcherError(f"no account {args.account!r}")
        print(f"auto-recharge {args.state} for {args.account}: below {args.threshold} "
              f"add {args.amount}")
        return 0
    return await _with_pool(settings, work)


async def cmd_accounts_show(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        row = await pool.fetchrow(q("get_account"), args.account)
        if row is None:
            raise DispatcherError(f"no account {args.account!r}")
        pause = await pool.fetchrow(q("account_pause_state"), args.account)
        shown = {**dict(row), **dict(pause or {})}
        print(json.dumps({**{k: _jsonable(v) for k, v in shown.items()},
                          "spend_guards": (await load_guards(pool, args.account)).as_json()},
                         indent=2))
        return 0
    return await _with_pool(settings, work)


async def cmd_accounts_smart_encoding(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        row = await pool.fetchrow(q("api_set_messaging_settings"), args.account,
                                  args.state == "on")
        if row is None:
            raise DispatcherError(f"no account {args.account!r}")
        print(f"smart encoding {args.state} for {args.account}")
        return 0
    return await _with_pool(settings, work)


async def cmd_accounts_quiet_hours(args: argparse.Namespace, settings: Settings) -> int:
    window = (None, None) if args.start == "off" else (args.start, args.end)
    if window[0] is not None and (window[1] is None or window[0] == window[1]):
        raise DispatcherError("give START END (HH:MM, different), or off")
    try:
        start, end = (None if t is None else parse_clock(t) for t in window)
    except ValueError as exc:
        raise DispatcherError(f"quiet hours: {exc}") from None

    async def work(pool: asyncpg.Pool) -> int:
        row = await pool.fetchrow(q("set_quiet_hours"), args.account, start, end)
        if row is None:
            raise DispatcherError(f"no account {args.account!r}")
        shown = f"{args.start}-{args.end}" if start is not None else "off"
        print(f"quiet hours {shown} for {args.account} (recipient's local time, bulk only)")
        return 0
    return await _with_pool(settings, work)


def _country_list(text: str) -> tuple[str, ...]:
    return tuple(c.strip().upper() for c in text.split(","))


# flag -> (GuardSettings field, parse); "off" turns a guard off
_GUARD_FLAGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "daily_cap": ("daily_spend_cap", int),
    "countries": ("allowed_countries", _country_list),
    "max_per_message": ("max_credits_per_message", int),
    "velocity_window": ("velocity_window_seconds", int),
    "velocity_multiple": ("velocity_multiple", float),
    "velocity_min": ("velocity_min_credits", int),
    "transactional_reserve": ("transactional_reserve", int),
    "transactional_overdraft": ("transactional_overdraft", int),
}


async def cmd_accounts_guards(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        current = await load_guards(pool, args.account)
        changes: dict[str, Any] = {}
        for flag, (name, parse) in _GUARD_FLAGS.items():
            value = getattr(args, flag)
            if value is not None:
                off = {"velocity_min_credits": 100, "transactional_reserve": 0,
                       "transactional_overdraft": 0}.get(name)
                try:
                    changes[name] = off if value == "off" else parse(value)
                except ValueError as exc:
                    raise DispatcherError(f"{name}: {value!r} is not valid") from exc
        if changes:
            merged = {**vars(current.settings), **changes}
            if (merged["velocity_window_seconds"] is None) != (merged["velocity_multiple"] is None):
                raise DispatcherError("--velocity-window and --velocity-multiple go together")
            if not await set_guards(pool, args.account, GuardSettings(**merged)):
                raise DispatcherError(f"no account {args.account!r}")
            current = await load_guards(pool, args.account)
        print(json.dumps(current.as_json(), indent=2))
        return 0
    return await _with_pool(settings, work)


async def cmd_accounts_release_velocity(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        released = await release_velocity(pool, args.account)
        print(f"velocity hold {'released' if released else 'not held'} for {args.account}")
        return 0
    return await _with_pool(settings, work)


def _add_guards(accounts: Any) -> None:
    guards = _command(accounts, "guards",
                      "show or change spend guards (a flag changes one guard; 'off' turns it off)")
    guards.add_argument("account")
    guards.add_argument("--daily-cap", metavar="CREDITS|off",
                        help="credits per UTC day; jobs past it are held until the next UTC day")
    guards.add_argument("--countries", metavar="US,CA,...|off",
                        help="allowed destination countries (ISO codes)")
    guards.add_argument("--max-per-message", metavar="CREDITS|off")
    guards.add_argument("--velocity-window", metavar="SECONDS|off")
    guards.add_argument("--velocity-multiple", metavar="X|off")
    guards.add_argument("--velocity-min", metavar="CREDITS|off")
    guards.add_argument("--transactional-reserve", metavar="CREDITS|off",
                        help="credits bulk work may not spend")
    guards.add_argument("--transactional-overdraft", metavar="CREDITS|off",
                        help="how far below zero transactional jobs may go")
    guards.set_defaults(func=cmd_accounts_guards)
    release = _command(accounts, "release-velocity",
                       "end a velocity hold: held bulk jobs go on (an owner's decision)")
    release.add_argument("account")
    release.set_defaults(func=cmd_accounts_release_velocity)


async def cmd_credits_grant(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        new = await CreditStore(pool).grant(args.account, args.amount, args.kind, args.reference)
        print(("granted" if new else "already granted (same reference)")
              + f" {args.amount} {args.kind} credits to {args.account}")
        return 0
    return await _with_pool(settings, work)


async def cmd_balance(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        b = await CreditStore(pool).balance(args.account)
        print(json.dumps({"account": b.account_id, "available": b.available,
                          "reserved": b.reserved, "total": b.total,
                          "subscription": b.subscription, "purchased": b.purchased,
                          "debt": b.debt}, indent=2))
        return 0
    return await _with_pool(settings, work)


async def cmd_rates_set(args: argparse.Namespace, settings: Settings) -> int:
    country = "*" if args.country in {"*", "default"} else args.country.upper()

    async def work(pool: asyncpg.Pool) -> int:
        await pool.execute(q("set_rate"), args.channel, country, args.credits)
        print(f"rate {args.channel} {country} = {args.credits} credit(s)")
        return 0
    return await _with_pool(settings, work)


async def cmd_rates_list(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        for row in await pool.fetch(q("list_rates")):
            print(f"{row['channel']:5} {row['country']:3} {row['credits']}")
        return 0
    return await _with_pool(settings, work)


async def cmd_renew(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        print(f"started {await renew_due(pool)} subscription period(s)")
        return 0
    return await _with_pool(settings, work)


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.service import run

    if args.migrate:
        await cmd_migrate(args, settings)
    else:
        conn = await connect(settings.database_url)
        try:
            await require_migrated(conn)
        finally:
            await conn.close()
    return await run(settings)


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.demo.run import run_demo

    configure_logging(settings.log_format, "warning")
    options = DemoOptions(recipients=args.recipients, balance=args.balance,
                          threshold=args.threshold, amount=args.amount,
                          latency_ms=args.latency_ms, rate_per_second=args.rate,
                          charge_latency_seconds=args.charge_latency,
                          database=args.database, timeout_seconds=args.timeout,
                          to=tuple(args.to))
    return await run_demo(settings, options, sys.stdout)


async def cmd_jobs_unresolved(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import UTC, datetime, timedelta

    from dispatcher.jobs.store import JobStore

    async def work(pool: asyncpg.Pool) -> int:
        cutoff = datetime.now(UTC) - timedelta(seconds=args.older_than)
        # sending and unknown since the send began, retry_wait since it came due
        stuck = await JobStore(pool).overdue(cutoff, limit=args.limit)
        for job in stuck:
            since = job.retry_at if job.status == "retry_wait" else job.sending_at
            print(f"{job.job_id}\t{job.account_id}\t{job.kind}\t{job.status}\t"
                  f"{job.reason or '-'}\tsince {(since or job.updated_at).isoformat()}")
        print(f"{len(stuck)} unresolved job(s)", file=sys.stderr)
        return 0
    return await _with_pool(settings, work)


async def cmd_jobs_show(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.jobs.view import JobViews, describe

    async def work(pool: asyncpg.Pool) -> int:
        view = await JobViews(pool, settings.hold_expiry_seconds).get(args.job_id)
        if view is None:
            raise DispatcherError(f"no job {args.job_id!r}")
        print(view.model_dump_json(indent=2) if args.json else describe(view))
        return 0
    return await _with_pool(settings, work)


async def cmd_jobs_resolve(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.jobs.store import JobStore

    async def work(pool: asyncpg.Pool) -> int:
        jobs = JobStore(pool)
        if args.not_sent:
            status = await jobs.not_sent(args.job_id, "resolved_not_sent_by_operator")
        else:
            job = await jobs.get(args.job_id)
            if job is None:
                raise DispatcherError(f"no job {args.job_id!r}")
            status = await jobs.provider_status(args.job_id, args.sent, "sent")
        print(f"job {args.job_id}: {status}")
        return 0
    return await _with_pool(settings, work)


async def cmd_tokens_create(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.tokens import create_token

    async def work(pool: asyncpg.Pool) -> int:
        token = await create_token(pool, args.account, args.role, operator=args.operator,
                                   name=args.name)
        print(token)
        print("store it now: only its hash is kept", file=sys.stderr)
        return 0
    return await _with_pool(settings, work)


async def cmd_tokens_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.tokens import revoke_token

    async def work(pool: asyncpg.Pool) -> int:
        if not await revoke_token(pool, args.token_id):
            print(f"no active token {args.token_id!r}", file=sys.stderr)
            return 1
        print(f"token {args.token_id} revoked")
        return 0
    return await _with_pool(settings, work)


def _fast_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (20-50 % faster I/O here), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


def _jsonable(value: object) -> object:
    return value if isinstance(value, int | str | bool | float | type(None)) else str(value)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive whole number")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be zero or more")
    return value


DATABASE_NEEDS = (
    "needs: PostgreSQL at DISPATCHER_DATABASE_URL (default " + DEFAULT_DATABASE_URL + "),\n"
    "       migrated with `dispatcher migrate` (create the database first with createdb)")
RUN_NEEDS = (
    DATABASE_NEEDS + "\n"
    "       RabbitMQ at DISPATCHER_AMQP_URL (default " + DEFAULT_AMQP_URL + "),\n"
    "       its exchanges and queues named DISPATCHER_AMQP_PREFIX.* (default dispatcher)\n"
    "       Twilio: DISPATCHER_TWILIO_ACCOUNT_SID and DISPATCHER_TWILIO_AUTH_TOKEN, and\n"
    "       DISPATCHER_TWILIO_BASE_URL to send to a sandbox instead (python -m\n"
    "       dispatcher.sandbox listens on http://127.0.0.1:8765)\n"
    "listens: DISPATCHER_HTTP_HOST:DISPATCHER_HTTP_PORT (default 127.0.0.1:8080): the API,\n"
    "       Twilio status callbacks (reached at DISPATCHER_PUBLIC_BASE_URL), /healthz,\n"
    "       /readyz, /metrics\n"
    "every setting: DISPATCHER_* variables, see the README's Configuration table")
DEMO_NEEDS = (
    "needs: PostgreSQL at 127.0.0.1:5432 (user postgres) and RabbitMQ at 127.0.0.1:5672;\n"
    "       starts its own dispatcher, Twilio sandbox and billing service, on free ports.\n"
    "       With DISPATCHER_TWILIO_ACCOUNT_SID / _AUTH_TOKEN set (and no _BASE_URL) it sends\n"
    "       for real to --to numbers; DISPATCHER_PUBLIC_BASE_URL must reach it then")


def _command(sub: Any, name: str, help_: str, needs: str = DATABASE_NEEDS
             ) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with what it needs (variables, services, ports)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_, description=help_, epilog=needs,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dispatcher", description=__doc__, epilog=RUN_NEEDS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _command(sub, "migrate", "apply database migrations").set_defaults(func=cmd_migrate)
    audit = _command(sub, "audit", "check the ledger's invariants")
    audit.add_argument("--billing-dsn", metavar="DSN",
                       help="also match every payment grant to its invoice in the reference "
                            "billing service's database (billing_ref.invoices)")
    audit.set_defaults(func=cmd_audit)
    _command(sub, "renew", "start subscription periods that are due").set_defaults(
        func=cmd_renew)

    accounts = sub.add_parser("accounts", help="manage accounts").add_subparsers(
        dest="accounts_command", required=True)
    create = _command(accounts, "create", "create an account")
    create.add_argument("account")
    create.add_argument("--name", default="")
    create.add_argument("--allocation", type=_non_negative, default=0,
                        help="subscription credits per period")
    create.add_argument("--cadence", choices=CADENCES, default="monthly")
    create.add_argument("--renewal-day", type=int, default=1)
    create.add_argument("--auto-recharge-threshold", type=_non_negative)
    create.add_argument("--auto-recharge-amount", type=_positive)
    create.set_defaults(func=cmd_accounts_create)
    show = _command(accounts, "show", "show an account")
    show.add_argument("account")
    show.set_defaults(func=cmd_accounts_show)
    recharge = _command(accounts, "auto-recharge",
                        "set auto-recharge: below THRESHOLD credits, buy AMOUNT more "
                        "(enabled, AMOUNT must be greater than THRESHOLD)")
    recharge.add_argument("account")
    recharge.add_argument("state", choices=("on", "off"))
    recharge.add_argument("--threshold", type=_non_negative, required=True)
    recharge.add_argument("--amount", type=_non_negative, required=True)
    recharge.add_argument("--topup-at-zero", action=argparse.BooleanOptionalAction,
                          default=None, help="top up at zero even when off (kept if omitted)")
    recharge.set_defaults(func=cmd_accounts_auto_recharge)
    smart = _command(accounts, "smart-encoding",
                     "turn Twilio Smart Encoding on or off (off by default)")
    smart.add_argument("account")
    smart.add_argument("state", choices=("on", "off"))
    smart.set_defaults(func=cmd_accounts_smart_encoding)
    quiet = _command(accounts, "quiet-hours",
                     "bulk messages wait while the recipient's local time is in START-END")
    quiet.add_argument("account")
    quiet.add_argument("start", help="HH:MM, or off")
    quiet.add_argument("end", nargs="?", help="HH:MM (before START: crosses midnight)")
    quiet.set_defaults(func=cmd_accounts_quiet_hours)
    _add_guards(accounts)

    credits = sub.add_parser("credits", help="grant credits").add_subparsers(
        dest="credits_command", required=True)
    grant = _command(credits, "grant", "grant rollover credits (idempotent by reference)")
    grant.add_argument("account")
    grant.add_argument("amount", type=_positive)
    grant.add_argument("--kind", choices=("purchase", "auto_recharge", "adjustment"),
                       default="adjustment")
    grant.add_argument("--reference", required=True, help="unique, e.g. the payment id")
    grant.set_defaults(func=cmd_credits_grant)

    run = _command(sub, "run", "run the dispatcher until SIGTERM", RUN_NEEDS)
    run.add_argument("--migrate", action="store_true", help="apply migrations first")
    run.set_defaults(func=cmd_run)

    _add_demo(sub)
    _add_tokens(sub)

    jobs = sub.add_parser("jobs", help="inspect and resolve jobs").add_subparsers(
        dest="jobs_command", required=True)
    unresolved = _command(jobs, "unresolved",
                          "unfinished jobs past their time: sending, retry_wait due, unknown")
    unresolved.add_argument("--older-than", type=float, default=0.0, help="seconds")
    unresolved.add_argument("--limit", type=int, default=500)
    unresolved.set_defaults(func=cmd_jobs_unresolved)
    show = _command(jobs, "show", "one job: state, history, credits, and why it has not gone")
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true", help="the whole view as JSON (as the API)")
    show.set_defaults(func=cmd_jobs_show)
    resolve = _command(jobs, "resolve", "settle an unknown job by hand")
    resolve.add_argument("job_id")
    how = resolve.add_mutually_exclusive_group(required=True)
    how.add_argument("--sent", metavar="SID", help="the provider SID it was sent as")
    how.add_argument("--not-sent", action="store_true", help="it was never sent: release")
    resolve.set_defaults(func=cmd_jobs_resolve)

    balance = _command(sub, "balance", "show an account's balance")
    balance.add_argument("account")
    balance.set_defaults(func=cmd_balance)

    rates = sub.add_parser("rates", help="per-country rates").add_subparsers(
        dest="rates_command", required=True)
    rate_set = _command(rates, "set", "set a rate (credits per segment or minute)")
    rate_set.add_argument("channel", choices=("sms", "call"))
    rate_set.add_argument("country", help="ISO alpha-2 code, or 'default'")
    rate_set.add_argument("credits", type=_non_negative)
    rate_set.set_defaults(func=cmd_rates_set)
    _command(rates, "list", "list rates").set_defaults(func=cmd_rates_list)
    return parser


def _add_tokens(sub: Any) -> None:
    from dispatcher.tokens import ROLES

    tokens = sub.add_parser("tokens", help="API bearer tokens").add_subparsers(
        dest="tokens_command", required=True)
    create = _command(tokens, "create", "create a token (printed once, stored hashed)")
    scope = create.add_mutually_exclusive_group(required=True)
    scope.add_argument("--account", help="the account the token acts for")
    scope.add_argument("--operator", action="store_true", help="cross-account operator token")
    create.add_argument("--role", choices=ROLES, required=True)
    create.add_argument("--name", default="", help="what the token is for")
    create.set_defaults(func=cmd_tokens_create)
    revoke = _command(tokens, "revoke", "revoke a token by its id (dsp_<id>_...)")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=cmd_tokens_revoke)


def _add_demo(sub: Any) -> None:
    d = DemoOptions()
    demo = _command(sub, "demo", "run the whole flow end to end on this machine, then stop",
                    DEMO_NEEDS)
    demo.add_argument("--recipients", type=_positive, default=d.recipients,
                      help="broadcast size (sandbox)")
    demo.add_argument("--balance", type=_non_negative, default=d.balance,
                      help="starting credits")
    demo.add_argument("--threshold", type=_non_negative, default=d.threshold,
                      help="auto-recharge threshold")
    demo.add_argument("--amount", type=_positive, default=d.amount, help="auto-recharge amount")
    demo.add_argument("--latency-ms", type=_non_negative, default=d.latency_ms,
                      help="sandbox latency per create")
    demo.add_argument("--rate", type=float, default=d.rate_per_second,
                      help="sends per second for the sending number")
    demo.add_argument("--charge-latency", type=float, default=d.charge_latency_seconds,
                      help="seconds each top-up charge takes at the fake payment gateway")
    demo.add_argument("--database", default=d.database, help="demo database (created if missing)")
    demo.add_argument("--timeout", type=float, default=d.timeout_seconds,
                      help="give up after this many seconds of broadcast")
    demo.add_argument("--to", action="append", default=[],
                      help="a real recipient (required with real Twilio credentials)")
    demo.set_defaults(func=cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except InvalidSetting as exc:
        print(f"error [invalid_setting]: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    func: Command = args.func
    try:
        with asyncio.Runner(loop_factory=_fast_loop()) as runner:
            return runner.run(func(args, settings))
    except DispatcherError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError) as exc:
        print(f"database error: {exc} — is the database migrated? run `dispatcher migrate`",
              file=sys.stderr)
        return 2
    except asyncpg.PostgresError as exc:
        print(f"database error: {exc}", file=sys.stderr)
        return 2
