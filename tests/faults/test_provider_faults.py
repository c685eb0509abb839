"""Every provider fault on every path a job can reach the provider by: still sent exactly once.

Paths: a consumed job; a job held at zero balance and released by the resumer; a broadcast
recipient; a job the reconciler resends (its first create hung and created nothing). Faults,
each on the first create to its own recipient number only: 429, a 5xx, a hang, accept-then-500
and accept-then-hang. Whatever the fault, the job must end sent once (exactly one accepted create
at the sandbox), charged once, with the ledger audit clean and every invariant holding.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from dispatcher.credits.ledger import CreditStore
from dispatcher.sandbox.state import NumberRule
from dispatcher.settings import Settings
from tests.faults.billing_sink import bind_billing_sink
from tests.faults.invariants import SENT, check_all
from tests.integration.dispatcher_fixture import RunningDispatcher, running_dispatcher, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

FAULTS: dict[str, NumberRule] = {
    "429": NumberRule(error_code=20429, http_status=429, fail_times=1),
    "5xx": NumberRule(error_code=20500, http_status=500, fail_times=1),
    "hang": NumberRule(hang=True, fail_times=1),
    "accept_then_500": NumberRule(accept_then_500=True, fail_times=1),
    "accept_then_hang": NumberRule(accept_then_hang=True, fail_times=1),
}
PATHS = ("consumed", "released", "broadcast", "reconciled")


def number(path: str, fault: str) -> str:
    return f"+1415556{PATHS.index(path)}{list(FAULTS).index(fault):03d}"


async def statuses(pool: asyncpg.Pool, accounts: list[str]) -> dict[str, str]:
    rows = await pool.fetch("SELECT job_id, status FROM jobs WHERE account_id = ANY($1::text[])",
                            accounts)
    return {r["job_id"]: r["status"] for r in rows}


async def send_reconciled(d: RunningDispatcher, account: str, prefix: str) -> list[str]:
    """Each job's first create hangs (nothing created): the reconciler must resend it, and that
    resend meets the fault."""
    ids = []
    for fault, rule in FAULTS.items():
        to = number("reconciled", fault)
        d.sandbox.state.set_rule(to, NumberRule(hang=True, fail_times=1))
        job_id = f"{prefix}-reconciled-{fault}"
        ids.append(job_id)
        await d.publish_sms(job_id, account, to=to, priority="transactional")

        async def hung(job_id: str = job_id, to: str = to) -> bool:
            return d.sandbox.state.count(to=to) >= 1 and (await d.job(job_id)) is not None
        await wait_for(hung, timeout=10)
        d.sandbox.state.set_rule(to, rule)
    return ids


@pytest.mark.timeout(180)
async def test_every_provider_fault_on_every_path_sends_exactly_once(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    prefix = f"pf-{uuid.uuid4().hex[:6]}"
    for path in ("consumed", "released", "broadcast"):
        for fault, rule in FAULTS.items():
            twilio_sandbox.state.set_rule(number(path, fault), rule)
    async with running_dispatcher(settings, twilio_sandbox, pool, twilio_timeout_seconds=1.0,
                                  reconcile_grace_seconds=2.0) as d:
        sink_connection, sink = await bind_billing_sink(d.settings)
        consumed = await d.funded_account(f"{prefix}-c", 100)
        held = await d.funded_account(f"{prefix}-h", 0)
        broadcasting = await d.funded_account(f"{prefix}-b", 100)
        reconciling = await d.funded_account(f"{prefix}-r", 100)
        accounts = [consumed, held, broadcasting, reconciling]
        ids = []
        for fault in FAULTS:
            ids.append(f"{prefix}-consumed-{fault}")
            await d.publish_sms(ids[-1], consumed, to=number("consumed", fault))
            ids.append(f"{prefix}-released-{fault}")
            await d.publish_sms(ids[-1], held, to=number("released", fault))

        async def all_held() -> bool:
            found = await statuses(pool, [held])
            return len(found) == len(FAULTS) and set(found.values()) == {"held"}
        await wait_for(all_held, timeout=20)
        await CreditStore(pool).grant(held, 100, "purchase", f"{held}-top")

        broadcast: dict[str, Any] = {
            "schema_version": 1, "id": f"{prefix}-bc", "kind": "broadcast",
            "account": broadcasting, "from": "+14155550199", "body": "fault path",
            "recipients": [{"to": number("broadcast", fault)} for fault in FAULTS]}
        await d.publisher.publish(broadcast)
        ids += await send_reconciled(d, reconciling, prefix)

        async def settled() -> bool:
            found = await statuses(pool, accounts)
            return (len(found) == len(ids) + len(FAULTS)
                    and all(status in SENT for status in found.values()))
        try:
            await wait_for(settled, timeout=90, interval=0.25)
        finally:
            found = await statuses(pool, accounts)
            stuck = {job: status for job, status in found.items() if status not in SENT}
            print(f"not sent: {stuck}")
        await asyncio.sleep(0.5)
        await twilio_sandbox.wait_callbacks()
        every_job = list(found)
        violations = await check_all(pool, twilio_sandbox, d.settings.public_base_url, accounts,
                                     every_job)
        await sink.delete(if_unused=False, if_empty=False)
        await sink_connection.close()
        assert violations == []
