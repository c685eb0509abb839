"""Jobs/s and CPU per job with 1, 2 and 3 dispatcher replicas against the cluster, in one run.

``python -m bench.scale [--jobs 3000] [--latency-ms 20] [--record]`` (``make bench`` runs it as
``scale``). It starts what ``tests/cluster`` starts: 3 private RabbitMQ nodes (quorum queues
replicated on all three), a PostgreSQL primary with a synchronous standby, and the Twilio
sandbox in a process of its own. For each replica count a fresh prefix and set of accounts
gets a backlog of ``--jobs`` jobs published up front; the replicas are started and timed until
every job is sent. CPU seconds are read from /proc for each side: the replicas, the 3 broker
nodes, both PostgreSQL servers and the sandbox, so the table shows per job where the CPU goes
and where the bottleneck moves as replicas are added. ``--record`` writes the table into
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import secrets
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg

from bench.pipeline_procs import Dispatcher, Sandbox, cpu_seconds
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.events.publisher import JobPublisher
from dispatcher.events.topology import Names
from dispatcher.migrate import migrate
from dispatcher.settings import Settings
from tests.cluster.nodes import RabbitCluster, ReplicatedPostgres
from tests.faults.nodes import free_port

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Scale: replicas against the cluster (issue 18, `bench/scale.py`)"
ACCOUNTS = 20


@dataclass(frozen=True)
class Run:
    """One replica count's figures."""

    replicas: int
    jobs: int
    seconds: float
    cpu: dict[str, float]  # CPU seconds by side: dispatcher, broker, postgres, sandbox

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    def per_job_ms(self, side: str) -> float:
        return 1000 * self.cpu[side] / self.jobs


def session_cpu(leader: int) -> float:
    """CPU seconds of every live process in the session led by ``leader`` (a broker node)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == leader:  # field 6 of stat: the session id
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def postgres_cpu(data: Path) -> float:
    """CPU seconds of a PostgreSQL server: its postmaster and every backend it forked."""
    try:
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if pid == postmaster or int(fields[1]) == postmaster:  # field 4: the parent pid
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Cluster:
    """The nodes, the sandbox, and CPU readings of each side."""

    def __init__(self, mq: RabbitCluster, pg: ReplicatedPostgres, sandbox: Sandbox,
                 dsn: str) -> None:
        self.mq, self.pg, self.sandbox, self.dsn = mq, pg, sandbox, dsn

    def infrastructure_cpu(self) -> dict[str, float]:
        broker = sum(session_cpu(node._proc.pid) for node in self.mq.nodes
                     if node._proc is not None)
        postgres = postgres_cpu(self.pg.primary.data) + postgres_cpu(self.pg.standby.data)
        return {"broker": broker, "postgres": postgres, "sandbox": self.sandbox.cpu()}


async def fund(pool: asyncpg.Pool, prefix: str, jobs: int) -> list[str]:
    accounts = [f"{prefix}-a{i:02d}" for i in range(ACCOUNTS)]
    for account in accounts:
        await create_account(pool, account)
        await CreditStore(pool).grant(account, jobs, "purchase", f"{account}-seed")
    return accounts


async def publish_backlog(settings: Settings, accounts: list[str], jobs: int) -> None:
    """``jobs`` confirmed jobs spread over ``accounts`` (onto a declared topology)."""
    async with await JobPublisher.connect(settings.amqp_url,
                                          Names(settings.amqp_prefix).jobs_exchange) as pub:
        for n in range(jobs):
            await pub.publish({"schema_version": 1, "id": f"{settings.amqp_prefix}-{n:06d}",
                               "kind": "sms", "account": accounts[n % len(accounts)],
                               "to": f"+1415555{n % 10000:04d}", "from": "+14155550199",
                               "body": f"scale {n}", "priority": "bulk"})


async def sent(pool: asyncpg.Pool, prefix: str) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM jobs WHERE job_id LIKE $1 AND status"
                                   " IN ('sent', 'delivered')", f"{prefix}-%"))


async def one_run(cluster: Cluster, pool: asyncpg.Pool, replicas: int, jobs: int,
                  workdir: Path) -> Run:
    """``jobs`` queued first (consumers paused), then drained by ``replicas`` replicas."""
    prefix = f"sc{replicas}{uuid.uuid4().hex[:6]}"
    accounts = await fund(pool, prefix, jobs)
    dispatchers = []
    for i in range(replicas):
        port = free_port()
        nodes = cluster.mq.rotated(i)
        settings = replace(
            Settings(), database_url=cluster.dsn, amqp_url=nodes, amqp_prefix=prefix,
            amqp_quorum_group_size=3, http_port=port, public_base_url=f"http://127.0.0.1:{port}",
            twilio_base_url=cluster.sandbox.base_url,
            twilio_account_sid=cluster.sandbox.account_sid,
            twilio_auth_token=cluster.sandbox.auth_token, sender_rate_per_second=100_000,
            max_in_flight=50, prefetch=100, db_pool_max=8, log_level="warning",
            log_format="json")
        dispatchers.append(Dispatcher(settings, workdir / f"{prefix}-{i}.log"))
    # The first replica declares the topology; it is stopped while the backlog is published,
    # so every replica starts on the same full queue.
    await asyncio.to_thread(dispatchers[0].start)
    await asyncio.to_thread(dispatchers[0].stop)
    await publish_backlog(dispatchers[0].settings, accounts, jobs)
    await asyncio.gather(*(asyncio.to_thread(d.start) for d in dispatchers))
    # Timed from the moment every replica is ready (jobs sent while others started up are not
    # counted) until 90 % of the backlog is sent (the tail runs on fewer busy workers).
    first, start_cpu = await sent(pool, prefix), cpu_now(cluster, dispatchers)
    started = time.monotonic()
    while (last := await sent(pool, prefix)) < 0.9 * jobs:
        await asyncio.sleep(0.2)
    seconds = time.monotonic() - started
    end_cpu = cpu_now(cluster, dispatchers)
    for d in dispatchers:
        await asyncio.to_thread(d.stop)
    cpu = {side: end_cpu[side] - start_cpu[side] for side in end_cpu}
    return Run(replicas, last - first, seconds, cpu)


def cpu_now(cluster: Cluster, dispatchers: list[Dispatcher]) -> dict[str, float]:
    """CPU seconds so far of every side."""
    return {"dispatcher": sum(cpu_seconds(d.child_pid) for d in dispatchers),
            **cluster.infrastructure_cpu()}


def table(runs: list[Run]) -> list[str]:
    lines = ["| replicas | jobs | jobs/s | CPU ms per job: dispatchers | broker (3 nodes) "
             "| PostgreSQL (primary + standby) | sandbox |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.replicas} | {r.jobs} | {r.rate:.0f} | {r.per_job_ms('dispatcher'):.2f} | "
              f"{r.per_job_ms('broker'):.2f} | {r.per_job_ms('postgres'):.2f} | "
              f"{r.per_job_ms('sandbox'):.2f} |" for r in runs]
    return lines


def record(runs: list[Run], latency_ms: int) -> None:
    """Replace the generated part of the section in RESULTS.md (findings below it are kept)."""
    load = os.getloadavg()
    generated = [
        SECTION, "",
        f"Recorded {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
        f"{os.cpu_count()} cores ({platform.machine()}), load average {load[0]:.1f} at the "
        f"end: **a shared, noisy host** (other work ran beside it), so read the ratios, not "
        f"the absolute rates. Sandbox latency {latency_ms} ms; 3 RabbitMQ nodes, quorum queues "
        "with 3 members; PostgreSQL primary + synchronous standby; "
        "`python -m bench.scale --record`.", "",
        *table(runs), "",
    ]
    text = RESULTS.read_text() if RESULTS.exists() else ""
    findings = "### Findings (issue 18; hand-written, kept by `--record`)"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        kept = rest[rest.index(findings):] if findings in rest else ""
        after = re.split(r"\n(?=## )", kept, maxsplit=1)
        body = "\n".join(generated) + "\n" + (after[0] if kept else findings + "\n")
        tail = ("\n" + after[1]) if kept and len(after) > 1 else ""
        RESULTS.write_text(head + body.rstrip("\n") + "\n" + tail)
    else:
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + "\n".join(generated) + "\n"
                           + findings + "\n")


async def main(jobs: int, latency_ms: int, replica_counts: list[int], write: bool) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    with RabbitCluster(3) as mq, ReplicatedPostgres() as pg:
        dsn = await asyncio.to_thread(pg.create_database, "scale")
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        sandbox = Sandbox(free_port(), f"AC{secrets.token_hex(16)}", secrets.token_hex(16),
                          workdir / "sandbox.log")
        sandbox.start({"latency_ms": latency_ms, "callbacks_enabled": True})
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        assert pool is not None
        runs = []
        try:
            cluster = Cluster(mq, pg, sandbox, dsn)
            for replicas in replica_counts:
                run = await one_run(cluster, pool, replicas, jobs, workdir)
                runs.append(run)
                print("\n".join(table([run])[2:]), flush=True)
        finally:
            await pool.close()
            sandbox.stop()
    print("\n".join(table(runs)))
    if write:
        record(runs, latency_ms)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--latency-ms", type=int, default=20)
    parser.add_argument("--replicas", default="1,2,3", help="replica counts, comma-separated")
    parser.add_argument("--record", action="store_true", help="write bench/RESULTS.md")
    args = parser.parse_args(argv)
    asyncio.run(main(args.jobs, args.latency_ms,
                     [int(n) for n in args.replicas.split(",")], args.record))


if __name__ == "__main__":
    cli()
