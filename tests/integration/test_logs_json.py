"""With JSON logs, a real ``dispatcher run`` writes one JSON object per line, with fixed event
names, and never a recipient's raw number or a message body (masked numbers may appear)."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import asyncpg

from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.events.publisher import JobPublisher
from dispatcher.events.topology import Names
from dispatcher.sandbox import NumberRule
from dispatcher.settings import Settings
from tests.acceptance.process import DispatcherProcess
from tests.integration.dispatcher_fixture import dispatcher_settings, drop_topology, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

EVENT_NAME = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)+")
EXPECTED_EVENTS = {"dispatcher_started", "consumer_started", "job_sent", "send_failed",
                   "status_callback", "job_dead_lettered", "job_held", "dispatcher_stopping",
                   "dispatcher_stopped"}


async def publish_flow(s: Settings, account: str, tag: str) -> tuple[list[str], list[str]]:
    """Two sends, a refused one, a held one and an invalid one; their numbers and bodies."""
    numbers = [f"+1415555{n}" for n in ("2301", "2302", "2303", "2304")]
    bodies = [f"private text {tag} {i} for the recipient only" for i in range(len(numbers))]
    async with await JobPublisher.connect(s.amqp_url, Names(s.amqp_prefix).jobs_exchange) as p:
        for i, (to, body) in enumerate(zip(numbers, bodies, strict=True)):
            # The last one goes to the account without credits: held.
            await p.publish({"schema_version": 1, "id": f"{account}-{i}", "kind": "sms",
                             "account": account if i < 3 else f"{account}-broke", "to": to,
                             "from": "+14155550199", "body": body})
        # Valid JSON, unknown account: dead-lettered with the number and body in the job.
        await p.publish({"schema_version": 1, "id": f"{account}-x", "kind": "sms",
                         "account": f"{account}-nobody", "to": "+14155552399",
                         "from": "+14155550199", "body": f"private text {tag} x"})
    return [*numbers, "+14155552399", "+14155550199"], [*bodies, f"private text {tag} x"]


async def test_json_logs_carry_fixed_events_and_no_numbers_or_bodies(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool,
        tmp_path: Path) -> None:
    s = dispatcher_settings(settings, twilio_sandbox, log_format="json", log_level="info")
    account = f"logs-{uuid.uuid4().hex[:8]}"
    await create_account(pool, account)
    await create_account(pool, f"{account}-broke")
    await CreditStore(pool).grant(account, 10, "purchase", f"{account}-seed")
    twilio_sandbox.state.set_rule("+14155552303", NumberRule(error_code=21211))
    process = DispatcherProcess(s, tmp_path / "dispatcher.log")
    process.start()
    try:
        numbers, bodies = await publish_flow(s, account, uuid.uuid4().hex[:6])

        async def flow_done() -> bool:
            rows = await pool.fetch("SELECT status FROM jobs WHERE account_id LIKE $1 || '%'",
                                    account)
            return sorted(r["status"] for r in rows) == ["delivered", "delivered", "failed",
                                                         "held"]
        await wait_for(flow_done, timeout=30)
        await twilio_sandbox.wait_callbacks()
        assert process.terminate() == 0
    finally:
        process.stop_quietly()
        await drop_topology(s)

    text = process.log_path.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert records and all(isinstance(r, dict) for r in records)
    for r in records:
        assert EVENT_NAME.fullmatch(r["event"]), r["event"]
        assert r["level"] in {"debug", "info", "warning", "error", "critical"}
        assert r["timestamp"].endswith("Z")
    assert {r["event"] for r in records} >= EXPECTED_EVENTS
    for secret in numbers + [n.removeprefix("+") for n in numbers] + bodies:
        assert secret not in text, f"{secret!r} is in the logs"
