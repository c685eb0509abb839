"""Outages pause the dispatcher; they neither stop it nor burn jobs (private nodes only).

PostgreSQL stopped with ``-m immediate`` for 2 s, 10 s and 60 s under load: the process stays
up, ``/readyz`` says not ready meanwhile, and once the database is back every valid job is sent
exactly once with nothing dead-lettered. (Before: the broadcast runner's first failed query
stopped the whole service with exit code 0, and handler errors requeued jobs until RabbitMQ
dropped them.) A ``credits.granted`` arriving during the outage is applied once it is over (it
used to burn its deliveries and be dropped). RabbitMQ killed with -9: ``/readyz`` reports
``checks.broker: false`` (it said true throughout).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest

from billing_client.events import CreditsGranted, encode_event
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.events.publisher import JobPublisher
from dispatcher.events.topology import Names
from dispatcher.migrate import migrate
from dispatcher.settings import Settings
from tests.acceptance.process import DispatcherProcess
from tests.acceptance.test_crash_recovery import sends_per_job
from tests.faults.nodes import PrivatePostgres, PrivateRabbitMQ
from tests.integration.dispatcher_fixture import dispatcher_settings, drop_topology, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

JOBS = 300
OUTAGE_SECONDS = 10.0


async def readyz(settings: Settings) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{settings.public_base_url}/readyz", timeout=aiohttp.ClientTimeout(total=5)) as r:
        return r.status, await r.json()


async def metric_sum(settings: Settings, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(
            f"{settings.public_base_url}/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def count(dsn: str, sql: str, *args: object) -> int:
    """One short connection per check: it must not depend on a pool that saw the crash."""
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return -1
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


@pytest.fixture
async def on_private_postgres(private_postgres: PrivatePostgres, twilio_sandbox: SandboxHandle,
                              tmp_path: Path) -> AsyncIterator[tuple[Settings, str,
                                                                     DispatcherProcess]]:
    dsn = await asyncio.to_thread(private_postgres.create_database, "dispatcher")
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        account = f"outage-{uuid.uuid4().hex[:6]}"
        await create_account(conn, account)
        await CreditStore(conn).grant(account, 10 * JOBS, "purchase", f"{account}-seed")
    finally:
        await conn.close()
    s = dispatcher_settings(
        replace(Settings(), database_url=dsn, amqp_prefix=f"fault{uuid.uuid4().hex[:8]}",
                log_format="json"),
        twilio_sandbox, db_command_timeout_seconds=5.0, reconcile_grace_seconds=3.0,
        max_in_flight=20, prefetch=50)
    process = DispatcherProcess(s, tmp_path / "dispatcher.log")
    yield s, account, process
    process.stop_quietly()
    await drop_topology(s)


async def publish_steadily(s: Settings, account: str, ids: list[str], seconds: float) -> None:
    async with await JobPublisher.connect(s.amqp_url, Names(s.amqp_prefix).jobs_exchange) as pub:
        for i, job_id in enumerate(ids):
            await pub.publish({"schema_version": 1, "id": job_id, "kind": "sms",
                               "account": account, "to": f"+1415555{i % 10000:04d}",
                               "from": "+14155550199", "body": f"outage test {i}"})
            await asyncio.sleep(seconds / len(ids))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("outage_seconds", [2.0, OUTAGE_SECONDS, 60.0])
async def test_a_database_outage_pauses_the_service_and_every_job_is_sent_once_after(
        on_private_postgres: tuple[Settings, str, DispatcherProcess],
        private_postgres: PrivatePostgres, twilio_sandbox: SandboxHandle,
        outage_seconds: float) -> None:
    s, account, process = on_private_postgres
    dsn = s.database_url
    process.start()
    ids = [f"{account}-{i:04d}" for i in range(JOBS)]
    publishing = asyncio.create_task(publish_steadily(s, account, ids, 20.0))

    async def some_sent() -> bool:
        return await count(dsn, "SELECT count(*) FROM jobs WHERE status IN ('sent', "
                                "'delivered')") >= 30
    await wait_for(some_sent, timeout=60)
    await asyncio.to_thread(private_postgres.stop)  # -m immediate: a crash, under load
    assert process.proc is not None
    not_ready: list[dict[str, Any]] = []
    deadline = time.monotonic() + outage_seconds
    while time.monotonic() < deadline:
        assert process.proc.poll() is None, (
            f"the service stopped during the outage (exit code {process.proc.returncode}):\n"
            + process.log_path.read_text()[-3000:])
        try:
            status, body = await readyz(s)
        except aiohttp.ClientError:
            status = 0  # the process may have just exited: the check above says so next
        if status == 503:
            not_ready.append(body["checks"])
        await asyncio.sleep(0.5)
    assert all(checks["database"] is False for checks in not_ready)
    if outage_seconds >= OUTAGE_SECONDS:  # a 2 s blip may end before readiness is asked
        assert not_ready
    await publish_grant(s, account, "outage-payment-1")
    await asyncio.sleep(3)  # the listener meets the outage with the grant in hand
    await asyncio.to_thread(private_postgres.start)
    await publishing

    async def all_sent() -> bool:
        return await count(dsn, "SELECT count(*) FROM jobs WHERE account_id = $1 "
                                "AND status IN ('sent', 'delivered')", account) == JOBS
    try:
        await wait_for(all_sent, timeout=120, interval=0.5)
    except AssertionError:
        conn = await asyncpg.connect(dsn)
        states = await conn.fetch("SELECT status, count(*) FROM jobs GROUP BY 1")
        await conn.close()
        raise AssertionError(f"jobs by status: {[tuple(r) for r in states]}") from None
    await twilio_sandbox.wait_callbacks()
    sends = sends_per_job(twilio_sandbox, s, ids)
    assert {job_id: n for job_id, n in sends.items() if n != 1} == {}
    assert (await readyz(s))[0] == 200
    assert await metric_sum(s, "dispatcher_dead_letters_total") == 0
    assert await metric_sum(s, "dispatcher_loop_failures_total") > 0  # loops rode it out
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(Names(s.amqp_prefix).dead_queue, passive=True)
        assert dead.declaration_result.message_count == 0

    async def granted() -> bool:
        return await count(dsn, "SELECT count(*) FROM ledger WHERE reference = $1",
                           "grant:outage-payment-1") == 1
    await wait_for(granted, timeout=30)
    assert await asyncio.to_thread(process.terminate) == 0


@pytest.mark.timeout(300)
async def test_a_database_outage_while_idle_is_ridden_out_and_work_resumes_by_itself(
        on_private_postgres: tuple[Settings, str, DispatcherProcess],
        private_postgres: PrivatePostgres, twilio_sandbox: SandboxHandle) -> None:
    """Nothing flowing when the database crashes: the loops and pool meet it on their own."""
    s, account, process = on_private_postgres
    process.start()
    await asyncio.to_thread(private_postgres.stop)
    await asyncio.sleep(OUTAGE_SECONDS)
    assert process.proc is not None and process.proc.poll() is None, (
        "the service stopped during an idle outage:\n" + process.log_path.read_text()[-3000:])
    assert (await readyz(s))[0] == 503
    await asyncio.to_thread(private_postgres.start)
    ids = [f"{account}-idle-{i:03d}" for i in range(30)]
    await publish_steadily(s, account, ids, 0.0)

    async def all_sent() -> bool:
        return await count(s.database_url, "SELECT count(*) FROM jobs WHERE account_id = $1 "
                           "AND status IN ('sent', 'delivered')", account) == len(ids)
    await wait_for(all_sent, timeout=90, interval=0.5)
    await twilio_sandbox.wait_callbacks()
    assert {j: n for j, n in sends_per_job(twilio_sandbox, s, ids).items() if n != 1} == {}
    assert (await readyz(s))[0] == 200
    assert await asyncio.to_thread(process.terminate) == 0


async def publish_grant(s: Settings, account: str, reference: str) -> None:
    """What the billing service sends after a payment, onto the billing exchange."""
    event = CreditsGranted(account=account, amount=500, kind="auto_recharge",
                           payment_reference=reference)
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(Names(s.amqp_prefix).billing_exchange)
        await exchange.publish(aio_pika.Message(encode_event(event), message_id=str(
            event.event_id), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key="credits.granted", mandatory=True)


@pytest.mark.timeout(300)
async def test_a_killed_broker_makes_readiness_say_so(
        database_url: str, twilio_sandbox: SandboxHandle, tmp_path: Path,
        private_rabbitmq: PrivateRabbitMQ) -> None:
    rabbit = private_rabbitmq
    s = dispatcher_settings(
        replace(Settings(), database_url=database_url, amqp_url=rabbit.url,
                amqp_prefix=f"fault{uuid.uuid4().hex[:8]}", log_format="json"),
        twilio_sandbox)
    process = DispatcherProcess(s, tmp_path / "dispatcher.log")
    try:
        process.start()
        status, body = await readyz(s)
        assert (status, body["checks"]["broker"]) == (200, True)
        await asyncio.to_thread(rabbit.kill9)

        async def broker_reported_down() -> bool:
            status, body = await readyz(s)
            return status == 503 and body["checks"]["broker"] is False
        await wait_for(broker_reported_down, timeout=15, interval=0.25)
        assert process.proc is not None and process.proc.poll() is None
        await asyncio.to_thread(rabbit.start)  # same node, same data: it comes back
        last: list[object] = []

        async def ready_again() -> bool:
            status, body = await readyz(s)
            last[:] = [status, body]
            return status == 200 and body["checks"]["broker"] is True
        try:
            await wait_for(ready_again, timeout=60, interval=0.5)
        except AssertionError:
            raise AssertionError(f"not ready again after the restart: {last}\n"
                                 + process.log_path.read_text()[-4000:]) from None
        # And work flows again: the consumers came back with the connection.
        account = f"rabbit-{uuid.uuid4().hex[:6]}"
        conn = await asyncpg.connect(database_url)
        try:
            await create_account(conn, account)
            await CreditStore(conn).grant(account, 10, "purchase", f"{account}-seed")
        finally:
            await conn.close()
        await publish_steadily(s, account, [f"{account}-after"], 0.0)

        async def sent_after_restart() -> bool:
            return await count(database_url, "SELECT count(*) FROM jobs WHERE job_id = $1 "
                               "AND status IN ('sent', 'delivered')", f"{account}-after") == 1
        await wait_for(sent_after_restart, timeout=30, interval=0.25)
        await asyncio.to_thread(rabbit.kill9)
        # Shutting down with the broker gone: bounded, and still a clean exit.
        assert await asyncio.to_thread(process.terminate) == 0
    finally:
        process.stop_quietly()
