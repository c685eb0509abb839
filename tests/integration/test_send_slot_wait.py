"""Jobs waiting for a provider slot longer than the reconciler's grace are still sent once.

A job waits for one of the ``max_in_flight`` provider slots after its reservation, in
`sending`. Past the grace the reconciler takes such a job for a crashed one and resends it, so a
job that waited long re-claims itself first (``claim_for_send``): exactly one of the two sends.
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

JOBS, LATENCY_MS = 8, 400  # one slot: the last job waits ~2.8 s, almost three graces


async def test_jobs_queued_for_one_provider_slot_past_the_grace_are_sent_once(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    twilio_sandbox.state.configure(latency_ms=LATENCY_MS)
    async with running_dispatcher(settings, twilio_sandbox, pool, max_in_flight=1, workers=JOBS,
                                  reconcile_grace_seconds=1.0,
                                  reconcile_interval_seconds=0.2) as d:
        tag = uuid.uuid4().hex[:8]
        bodies = [f"slot {tag} {i}" for i in range(JOBS)]
        accounts = [await d.funded_account(f"slot-{tag}-{i}", 1) for i in range(JOBS)]
        for i, (account, body) in enumerate(zip(accounts, bodies, strict=True)):
            await d.publish_sms(f"slot-{tag}-{i}", account, to=f"+1415555{3000 + i}", body=body)

        async def all_sent() -> bool:
            done = await pool.fetchval("SELECT count(*) FROM jobs WHERE status IN "
                                       "('sent', 'delivered') AND account_id = ANY($1)",
                                       accounts)
            return bool(done == JOBS)
        await wait_for(all_sent, timeout=30)
        await asyncio.sleep(1.5)  # give a wrongful second send the time to happen
        creates = Counter(r.body for r in twilio_sandbox.state.creates() if r.body in bodies)
        assert creates == dict.fromkeys(bodies, 1), creates
        taken_over = await pool.fetchval(
            "SELECT count(*) FROM jobs WHERE account_id = ANY($1) AND attempts > 1", accounts)
        # The reconciler did take some over: without the re-claim those were sent twice.
        assert taken_over > 0
        assert await run_audit(pool) == []
