"""``dispatcher demo``: the whole flow on this machine, end to end, then everything stopped.

Migrates a demo database, starts the dispatcher, the Twilio sandbox (skipped when real Twilio
credentials are configured) and the reference billing service as child processes on a fresh
AMQP prefix, funds an account with a small balance and auto-recharge, prints a broadcast
pre-flight, publishes the broadcast and follows it live through pause at zero, the auto top-up
and resume, then prints a summary and stops every child, also on Ctrl-C or failure.
"""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aiohttp
import asyncpg
import structlog

from dispatcher.api.optouts import record_opt_out
from dispatcher.broadcasts.preflight import Recipients
from dispatcher.broadcasts.runner import Broadcasts
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.rates import RateCache
from dispatcher.credits.subscriptions import create_account
from dispatcher.demo.options import DemoOptions
from dispatcher.demo.processes import Child, ChildFailed, Children, child_env, free_port
from dispatcher.demo.report import DemoReport, print_preflight, print_summary
from dispatcher.demo.setup import (
    DEMO_BODY,
    DEMO_SENDER,
    OPTED_OUT_NUMBER,
    DemoFailed,
    SandboxCredentials,
    billing_consuming,
    billing_env,
    demo_recipients,
    dispatcher_env,
    drop_demo_topology,
    extra_recipients,
    prepare_database,
    uses_real_twilio,
)
from dispatcher.errors import DispatcherError
from dispatcher.events.publisher import JobPublisher
from dispatcher.events.topology import Names
from dispatcher.pricing.templates import Template
from dispatcher.settings import Settings

log = structlog.get_logger(__name__)


@dataclass
class Stack:
    """What the demo started: children, ports, prefix and where the logs go."""

    settings: Settings
    options: DemoOptions
    out: TextIO
    log_dir: Path
    prefix: str
    children: Children
    db_url: str = ""
    http_port: int = 0
    dispatcher: Child | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


async def run_demo(settings: Settings, options: DemoOptions, out: TextIO) -> int:
    """Run the demo; 0 when the broadcast completed and the ledger audit is clean."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    log_dir = Path(tempfile.mkdtemp(prefix="dispatcher-demo-"))
    stack = Stack(settings, options, out, log_dir, f"demo-{uuid.uuid4().hex[:8]}",
                  Children(log_dir))
    try:
        return await _run(stack)
    except asyncio.CancelledError:
        stack.say("\ninterrupted: stopping everything the demo started")
        return 130
    except (ChildFailed, DispatcherError) as exc:
        stack.say(f"\ndemo failed: {exc}")
        return 1
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        await _stop(stack)


async def _run(stack: Stack) -> int:
    started = time.monotonic()
    stack.db_url, applied = await prepare_database(stack.settings.database_url,
                                                   stack.options.database)
    stack.say(f"database {stack.options.database} created afresh, {len(applied)} migrations; "
              f"AMQP prefix {stack.prefix}; logs in {stack.log_dir}")
    await _start_children(stack)
    pool = await asyncpg.create_pool(stack.db_url, min_size=1, max_size=3)
    assert pool is not None
    try:
        account = await _fund_account(stack, pool)
        recipients = _recipients(stack)
        result = await Broadcasts(pool, RateCache(pool)).preflight(
            account, Template(DEMO_BODY, False), Recipients.from_dicts(recipients))
        print_preflight(stack.say, result)
        broadcast_id = f"{account}-broadcast"
        await _publish(stack, account, broadcast_id, recipients)
        report = DemoReport(stack.say, pool, account, broadcast_id, stack.children, stack.out)
        completed = await report.follow(stack.options.timeout_seconds)
        spent = report.last.credits_spent if report.last else 0
        metrics_text = await _metrics_snapshot(stack, spent)
        audit_ok = await print_summary(report, result, metrics_text, stack.base_url,
                                       stack.log_dir, time.monotonic() - started)
    finally:
        await pool.close()
    return 0 if completed and audit_ok else 1


async def _start_children(stack: Stack) -> None:
    s, children = stack.settings, stack.children
    stack.http_port = s.http_port if uses_real_twilio(s) else free_port()
    sandbox = None
    if uses_real_twilio(s):
        stack.say("Twilio credentials found: sending for real (no sandbox)")
    else:
        sandbox = await _start_sandbox(stack)
    env = dispatcher_env(s, stack.db_url, stack.prefix, stack.http_port, sandbox,
                         stack.options.rate_per_second)
    billing_settings = billing_env(s, stack.db_url, stack.prefix,
                                   stack.options.charge_latency_seconds)
    billing = children.start("billing", "billing_client.reference", ["run"],
                             _env(billing_settings))
    stack.dispatcher = children.start("dispatcher", "dispatcher", ["run"], _env(env))
    await children.wait_ready(stack.dispatcher, lambda: _http_ok(f"{stack.base_url}/readyz"))
    await children.wait_ready(billing, lambda: billing_consuming(s.amqp_url, stack.prefix))
    names = ", ".join(f"{c.name} (pid {c.pid})" for c in children.started)
    stack.say(f"started {names}; dispatcher at {stack.base_url}")


async def _start_sandbox(stack: Stack) -> tuple[str, SandboxCredentials]:
    creds = SandboxCredentials.random()
    port = free_port()
    scenario = stack.log_dir / "sandbox-scenario.json"
    scenario.write_text(json.dumps({"latency_ms": stack.options.latency_ms}))
    sandbox = stack.children.start(
        "sandbox", "dispatcher.sandbox",
        ["--port", str(port), "--account-sid", creds.account_sid, "--auth-token",
         creds.auth_token, "--scenario", str(scenario), "--callback-workers", "12"],
        _env({}))
    base_url = f"http://127.0.0.1:{port}"
    await stack.children.wait_ready(sandbox, lambda: _http_ok(f"{base_url}/_sandbox/scenario"))
    return base_url, creds


def _env(overrides: dict[str, str]) -> dict[str, str]:
    return child_env(overrides, drop_prefixes=("DISPATCHER_", "BILLING_"))


async def _http_ok(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(
                url, timeout=aiohttp.ClientTimeout(total=2)) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _fund_account(stack: Stack, pool: asyncpg.Pool) -> str:
    o = stack.options
    account = stack.prefix
    await create_account(pool, account, name="Demo customer",
                         auto_recharge=(True, o.threshold, o.amount))
    await CreditStore(pool).grant(account, o.balance, "purchase", f"{account}-welcome")
    await record_opt_out(pool, account, OPTED_OUT_NUMBER, "demo")
    stack.say(f"account {account}: balance {o.balance}, auto-recharge below {o.threshold} "
              f"adds {o.amount}")
    return account


def _recipients(stack: Stack) -> list[dict[str, object]]:
    if uses_real_twilio(stack.settings):
        if not stack.options.to:
            raise DemoFailed("with real Twilio credentials, pass the recipients: --to +1555…")
        return [{"to": to, "vars": {"name": "there", "order": "#1"}} for to in stack.options.to]
    recipients = demo_recipients(stack.options.recipients)
    return recipients + extra_recipients(OPTED_OUT_NUMBER, str(recipients[0]["to"]))


async def _publish(stack: Stack, account: str, broadcast_id: str,
                   recipients: list[dict[str, object]]) -> None:
    job = {"schema_version": 1, "id": broadcast_id, "kind": "broadcast", "account": account,
           "from": DEMO_SENDER, "body": DEMO_BODY, "recipients": recipients,
           "priority": "bulk"}
    publisher = await JobPublisher.connect(stack.settings.amqp_url,
                                           Names(stack.prefix).jobs_exchange)
    async with publisher:
        await publisher.publish(job)
    stack.say(f"published broadcast {broadcast_id} ({len(recipients)} recipients) "
              f"to {Names(stack.prefix).jobs_exchange}")


async def _metrics_snapshot(stack: Stack, captured: int) -> str:
    """``/metrics`` once the ledger sampler (a second behind) has counted what was captured."""
    text, deadline = "", time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            async with aiohttp.ClientSession() as session, session.get(
                    f"{stack.base_url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return ""
        if f'dispatcher_credits_total{{operation="captured"}} {captured:.1f}' in text:
            break
        await asyncio.sleep(0.25)
    (stack.log_dir / "metrics.txt").write_text(text)
    return text


async def _stop(stack: Stack) -> None:
    codes = await stack.children.stop_all()
    if stack.children.started:
        try:
            await drop_demo_topology(stack.settings.amqp_url, stack.prefix)
        except Exception as exc:  # the broker may be what failed; say so and go on
            stack.say(f"could not delete the demo's queues ({type(exc).__name__})")
        stopped = ", ".join(f"{name} (exit {code})" for name, code in codes.items())
        stack.say(f"stopped {stopped}; queues of {stack.prefix} deleted; nothing left running")
