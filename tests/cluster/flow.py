"""What every cluster scenario does: replicas on the cluster, a publisher that retries through
node losses, a meter of sends per second, and the invariants at the end."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import aio_pika
import asyncpg
from aio_pika.abc import AbstractQueue, AbstractRobustConnection

from billing_client.amqp import connect_robust
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.errors import ServiceUnavailable
from dispatcher.events.publisher import JobNotPublished, JobPublisher
from dispatcher.events.topology import Names, quorum
from dispatcher.migrate import migrate
from dispatcher.settings import Settings
from tests.acceptance.process import ROOT, DispatcherProcess, settings_env
from tests.cluster.nodes import RabbitCluster
from tests.faults.billing_sink import drain, low_balance_problems
from tests.faults.invariants import TERMINAL, check_all
from tests.integration.dispatcher_fixture import dispatcher_settings, wait_for
from tests.integration.sandbox_fixture import SandboxHandle

RECIPIENTS = [f"+1415555{n:04d}" for n in range(10)]
READY_SECONDS = 90.0
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError,
             asyncpg.TargetServerAttributeNotMatched)


class Replica(DispatcherProcess):
    """``dispatcher run`` as a process, given longer to get ready on a busy 2-core host; one
    that exits while starting (the database failing over under it) is started again, as its
    supervisor would."""

    def start(self) -> None:
        deadline = time.monotonic() + READY_SECONDS
        self._spawn()
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                time.sleep(1.0)
                self._spawn()
                continue
            try:
                with urlopen(f"{self.settings.public_base_url}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("replica did not become ready:\n" + self.log_path.read_text()[-3000:])

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "dispatcher", "run"], cwd=ROOT,
                                         env=settings_env(self.settings), stdout=log,
                                         stderr=log)


@dataclass
class Stack:
    """Replicas of one dispatcher deployment on the cluster, and the test's view of it."""

    dsn: str
    prefix: str
    replicas: list[Replica]
    pool: asyncpg.Pool
    mq: RabbitCluster
    kills: list[str] = field(default_factory=list)

    @property
    def base_urls(self) -> list[str]:
        return [r.settings.public_base_url for r in self.replicas]

    def start_all(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(len(self.replicas)) as threads:
            for future in [threads.submit(r.start) for r in self.replicas]:
                future.result()

    def stop_all(self) -> None:
        for replica in self.replicas:
            replica.stop_quietly()

    def logs(self) -> Iterator[str]:
        for replica in self.replicas:
            yield replica.log_path.read_text(errors="replace")


def replica_settings(dsn: str, urls: str, prefix: str, sandbox: SandboxHandle,
                     **overrides: Any) -> Settings:
    base = replace(Settings(), database_url=dsn, amqp_url=urls, amqp_prefix=prefix,
                   amqp_quorum_group_size=3, log_format="json", log_level="warning")
    # Warnings only: four info lines per job cost the replicas CPU the host does not have; the
    # events the tests look for (database_server_changed, amqp_reconnected) are warnings.
    values: dict[str, Any] = {"reconcile_grace_seconds": 5.0, "max_in_flight": 30,
                              "prefetch": 60, "db_command_timeout_seconds": 5.0,
                              "db_pool_max": 6, "reconcile_interval_seconds": 2.0,
                              "hold_sweep_interval_seconds": 5.0}
    return dispatcher_settings(base, sandbox, **{**values, **overrides})


async def open_stack(dsn: str, mq: RabbitCluster, sandbox: SandboxHandle, tmp_path: Path,
                     replicas: int, **overrides: Any) -> Stack:
    """Migrate the database and build ``replicas`` processes (not started), each listing the
    cluster's nodes from a different one."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    prefix = f"cl{uuid.uuid4().hex[:8]}"
    processes = [Replica(replica_settings(dsn, mq.rotated(i), prefix, sandbox, **overrides),
                         tmp_path / f"replica-{i}.log") for i in range(replicas)]
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, command_timeout=10)
    assert pool is not None
    return Stack(dsn, prefix, processes, pool, mq)


async def fund(pool: asyncpg.Pool, prefix: str, accounts: int, jobs_each: int,
               dry: int) -> tuple[list[str], list[str]]:
    """``accounts`` accounts with auto-recharge; the first ``dry`` can pay for half their jobs."""
    names = [f"{prefix}-a{i:02d}" for i in range(accounts)]
    store = CreditStore(pool)
    for i, account in enumerate(names):
        await create_account(pool, account, auto_recharge=(True, 10, 50))
        await store.grant(account, jobs_each // 2 if i < dry else 2 * jobs_each, "purchase",
                          f"{account}-seed")
    return names, names[:dry]


async def top_up(pool: asyncpg.Pool, accounts: Sequence[str], credits: int) -> None:
    """Grant ``credits`` to each account, retrying through a failover (idempotent reference)."""
    for account in accounts:
        while True:
            try:
                await CreditStore(pool).grant(account, credits, "purchase", f"{account}-top")
                break
            except DB_ERRORS:
                await asyncio.sleep(0.3)


def jobs_for(accounts: Sequence[str], jobs_each: int, rng: random.Random) -> list[dict[str, Any]]:
    """Every account's jobs, interleaved in an order drawn from ``rng``."""
    jobs = [(account, n) for account in accounts for n in range(jobs_each)]
    jobs.sort(key=lambda job: (job[1], rng.random()))
    return [{"schema_version": 1, "id": f"{account}-j{n:04d}", "kind": "sms",
             "account": account, "to": rng.choice(RECIPIENTS), "from": "+14155550199",
             "body": f"cluster run {account} {n}", "priority": "bulk"} for account, n in jobs]


async def publish(urls: str, prefix: str, jobs: Sequence[dict[str, Any]],
                  per_second: float | None = None) -> int:
    """Publish every job, confirmed; a job whose publish failed (its node died) is published
    again with the same id. Returns how many publishes were retried."""
    retried = 0
    publisher = await JobPublisher.connect(urls, Names(prefix).jobs_exchange, timeout=5)
    try:
        for job in jobs:
            while True:
                try:
                    await publisher.publish(job, timeout=5)
                    break
                except (JobNotPublished, ServiceUnavailable):
                    retried += 1
                    await asyncio.sleep(0.2)
            if per_second:
                await asyncio.sleep(1 / per_second)
    finally:
        await publisher.close()
    return retried


class SentMeter:
    """Samples how many of the run's jobs are sent, twice a second, through every outage."""

    def __init__(self, pool: asyncpg.Pool, accounts: Sequence[str]) -> None:
        self._pool = pool
        self._accounts = list(accounts)
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def sent(self) -> int | None:
        try:
            return int(await self._pool.fetchval(
                "SELECT count(*) FROM jobs WHERE account_id = ANY($1::text[])"
                " AND status = ANY($2::text[])", self._accounts,
                ["sent", "delivered", "undelivered"], timeout=2))
        except DB_ERRORS:
            return None

    async def _run(self) -> None:
        while True:
            count = await self.sent()
            if count is not None:
                self.samples.append((time.monotonic(), count))
            await asyncio.sleep(0.5)

    def rate(self, start: float, end: float) -> float:
        """Jobs sent per second between two moments (0 without samples in the window)."""
        window = [(t, n) for t, n in self.samples if start <= t <= end]
        if len(window) < 2 or window[-1][0] <= window[0][0]:
            return 0.0
        return (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])

    def first_progress_after(self, moment: float) -> float | None:
        """When the sent count first grew after ``moment`` (service back after an outage)."""
        before = max((n for t, n in self.samples if t <= moment), default=0)
        return next((t for t, n in self.samples if t > moment and n > before), None)

    def last_send(self) -> float:
        """When the sent count reached its final value (the end of the flow, before the
        reconciler's tail of lost callbacks)."""
        final = max((n for _, n in self.samples), default=0)
        return next((t for t, n in self.samples if n == final), time.monotonic())

    async def wait_sent(self, count: int, timeout: float = 60) -> None:
        async def enough() -> bool:
            return (await self.sent() or 0) >= count
        await wait_for(enough, timeout=timeout, interval=0.2)


async def quiescent(pool: asyncpg.Pool, accounts: Sequence[str], total: int) -> bool:
    """Every job recorded and final (or held), the outbox relayed, no reservation pending."""
    try:
        row = await pool.fetchrow(
            "SELECT count(*) AS jobs,"
            "       count(*) FILTER (WHERE status <> ALL($2::text[]) AND status <> 'held') AS busy,"
            "       (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS outbox,"
            "       (SELECT count(*) FROM reservations WHERE account_id = ANY($1::text[])"
            "           AND status = 'pending') AS pending"
            "  FROM jobs WHERE account_id = ANY($1::text[])", list(accounts), list(TERMINAL),
            timeout=5)
    except DB_ERRORS:
        return False
    assert row is not None
    return bool(row["jobs"] == total and row["busy"] == 0 and row["outbox"] == 0
                and row["pending"] == 0)


async def open_billing_sink(urls: str, prefix: str) -> tuple[AbstractRobustConnection,
                                                            AbstractQueue]:
    """What a billing service would receive, on a quorum queue that survives a node's loss."""
    connection = await connect_robust(urls)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(Names(prefix).billing_exchange,
                                              aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"{prefix}.billing-sink", durable=True,
                                        arguments=quorum(3))
    await queue.bind(exchange, routing_key="#")
    return connection, queue


async def verify(stack: Stack, sandbox: SandboxHandle, accounts: list[str],
                 sink: AbstractQueue) -> list[str]:
    """Every invariant of ``tests.faults.invariants``, over every replica's callbacks, and each
    low-balance crossing relayed to billing exactly once."""
    await sandbox.wait_callbacks()
    pool = stack.pool
    every_job = [r["job_id"] for r in await pool.fetch(
        "SELECT job_id FROM jobs WHERE account_id = ANY($1::text[])", accounts)]
    violations = await check_all(pool, sandbox, stack.base_urls, accounts, every_job)
    billing = await drain(sink)
    violations += low_balance_problems(billing)
    lows = await pool.fetchval("SELECT count(*) FROM outbox WHERE routing_key = 'balance.low'"
                               " AND body->>'account' = ANY($1::text[])", accounts)
    received = {b["event_id"] for b in billing if b["type"] == "balance.low"}
    if len(received) != lows:
        violations.append(f"billing received {len(received)} of {lows} balance.low events")
    return violations


async def drop_sink(connection: AbstractRobustConnection, queue: AbstractQueue) -> None:
    try:
        async with asyncio.timeout(10):
            await queue.delete(if_unused=False, if_empty=False)
    except (TimeoutError, aio_pika.exceptions.AMQPError):
        pass
    await connection.close()
