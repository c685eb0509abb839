"""SIGTERM with a provider slower than the shutdown timeout: the log counts what was left.

Jobs whose provider call outlives the drain stay ``sending`` (for the reconciler); the
``consumer_stopped`` line must say how many, not ``unfinished: 0`` as it used to.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import asyncpg

from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.settings import Settings
from tests.acceptance.process import DispatcherProcess
from tests.acceptance.test_crash_recovery import count, publish_jobs
from tests.integration.dispatcher_fixture import dispatcher_settings, drop_topology, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

IN_FLIGHT = 10


async def test_a_sigterm_that_cannot_drain_logs_the_jobs_left_in_flight(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool,
        tmp_path: Path) -> None:
    s = dispatcher_settings(settings, twilio_sandbox, log_format="json",
                            max_in_flight=IN_FLIGHT, prefetch=20, twilio_timeout_seconds=30.0,
                            shutdown_timeout_seconds=1.0, reconcile_grace_seconds=60.0)
    account = f"slow-{uuid.uuid4().hex[:8]}"
    await create_account(pool, account)
    await CreditStore(pool).grant(account, 1000, "purchase", f"{account}-seed")
    twilio_sandbox.state.configure(latency_ms=8000)  # far beyond the 1 s shutdown timeout
    process = DispatcherProcess(s, tmp_path / "dispatcher.log")
    try:
        process.start()
        await publish_jobs(s, account, 3 * IN_FLIGHT)

        async def slots_full() -> bool:
            return await count(pool, "SELECT count(*) FROM jobs WHERE account_id = $1 "
                                     "AND status = 'sending'", account) == IN_FLIGHT
        await wait_for(slots_full, timeout=30)
        assert await asyncio.to_thread(process.terminate) == 0
    finally:
        process.stop_quietly()
        await drop_topology(s)
    left = await count(pool, "SELECT count(*) FROM jobs WHERE account_id = $1 "
                             "AND status = 'sending'", account)
    events = [json.loads(line) for line in (tmp_path / "dispatcher.log").read_text().splitlines()
              if line.startswith("{")]
    stopped = [event for event in events if event.get("event") == "consumer_stopped"]
    assert left == IN_FLIGHT
    assert [line["unfinished"] for line in stopped] == [left]
