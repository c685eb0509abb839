"""A sender's rate limit that makes jobs wait longer than the reconciler's grace never resends.

The reconciler takes a job found `sending` past its grace for one whose process died around
the provider call. A job waiting for its sender's turn must therefore never wait in `sending`
(or, once released from hold, must lose to the reconciler cleanly): one provider call per job.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import asyncpg

from dispatcher.credits.audit import run_audit
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import running_dispatcher, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

RATE, JOBS = 2.0, 8  # the last job waits ~3 s for its turn, three times the grace
SENDER = "+14155550199"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def run_slow_sender(settings: Settings, sandbox: SandboxHandle, pool: asyncpg.Pool,
                          *, broadcast: bool) -> None:
    async with running_dispatcher(settings, sandbox, pool, sender_rate_per_second=RATE,
                                  reconcile_grace_seconds=1.0,
                                  reconcile_interval_seconds=0.2) as d:
        bodies = [f"slow {i}" for i in range(JOBS)]
        accounts: list[str] = []
        if broadcast:
            account = await d.funded_account(uid("acct"), JOBS)
            accounts.append(account)
            await d.publisher.publish({
                "schema_version": 1, "id": uid("bc"), "kind": "broadcast", "account": account,
                "from": SENDER, "body": "slow {i}",
                "recipients": [{"to": f"+1415555{2000 + i}", "vars": {"i": str(i)}}
                               for i in range(JOBS)]})
        else:
            # One sending number shared by many accounts: their jobs begin side by side.
            for body in bodies:
                account = await d.funded_account(uid("acct"), 1)
                accounts.append(account)
                await d.publisher.publish({"schema_version": 1, "id": uid("slow"),
                                           "kind": "sms", "account": account, "from": SENDER,
                                           "to": "+14155550100", "body": body})

        async def all_sent() -> bool:
            done = await pool.fetchval("SELECT count(*) FROM jobs WHERE status IN "
                                       "('sent', 'delivered') AND account_id = ANY($1)",
                                       accounts)
            return bool(done == JOBS)
        await wait_for(all_sent, timeout=30)
        await asyncio.sleep(1.5)  # give a wrongful reconciler resend the time to happen
        creates = Counter(r.body for r in sandbox.state.creates() if r.body in bodies)
        assert creates == dict.fromkeys(bodies, 1), creates
        assert await run_audit(pool) == []


async def test_jobs_of_many_accounts_waiting_for_one_slow_sender_are_sent_once(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    await run_slow_sender(settings, twilio_sandbox, pool, broadcast=False)


async def test_broadcast_recipients_waiting_for_a_slow_sender_are_sent_once(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    await run_slow_sender(settings, twilio_sandbox, pool, broadcast=True)
