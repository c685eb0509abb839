"""A 3-node RabbitMQ cluster and a PostgreSQL primary with a synchronous standby, all private.

Built on ``tests.faults.nodes`` (free ports, temporary directories, never the shared 5432/5672)::

    with RabbitCluster(3) as mq:        # 3 nodes booted at once, 2 joined to the first (~60 s)
        mq.urls                         # "amqp://…:p1/,amqp://…:p2/,amqp://…:p3/"
        mq.nodes[1].kill9(); mq.nodes[1].start()   # back in the cluster (same Mnesia dir)

    with ReplicatedPostgres() as pg:    # primary + pg_basebackup -R standby, synchronous (~15 s)
        dsn = pg.create_database("d")   # postgresql://postgres@h:p1,h:p2/d?target_session_attrs=…
        seconds = pg.fail_over()        # kill the primary (-m immediate), pg_ctl promote

After a failover the old primary stays down (no rewind): the standby is the only node.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import subprocess
import time
from pathlib import Path

from tests.faults.nodes import Node, PrivatePostgres, PrivateRabbitMQ

RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
CTL_TIMEOUT_SECONDS = 120.0


class RabbitCluster(Node):
    """``size`` private RabbitMQ nodes sharing an Erlang cookie, clustered with join_cluster."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [PrivateRabbitMQ() for _ in range(size)]
        cookie = secrets.token_hex(16).upper()
        for node in self.nodes:  # HOME is the node's root: the cookie Erlang reads
            path = node.root / ".erlang.cookie"
            path.write_text(cookie)
            path.chmod(0o400)

    @property
    def urls(self) -> str:
        """Every node's AMQP URL, comma-separated (``DISPATCHER_AMQP_URL``)."""
        return ",".join(node.url for node in self.nodes)

    def rotated(self, offset: int) -> str:
        """The same list starting at node ``offset``: replicas spread over the nodes."""
        nodes = self.nodes[offset % len(self.nodes):] + self.nodes[:offset % len(self.nodes)]
        return ",".join(node.url for node in nodes)

    def ctl(self, node: PrivateRabbitMQ, *args: str) -> str:
        """``rabbitmqctl -n <node> args`` with that node's cookie; returns its output."""
        rabbitmqctl = RABBITMQCTL if RABBITMQCTL.exists() else Path("rabbitmqctl")
        result = subprocess.run([str(rabbitmqctl), "-n", node.name, *args], env=node._env(),
                                capture_output=True, text=True, check=False, cwd=node.root,
                                timeout=CTL_TIMEOUT_SECONDS)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {node.name} failed "
                               f"({result.returncode}): {result.stdout}{result.stderr}")
        return result.stdout

    def start(self) -> None:
        """Boot every node at once, then join the others to the first, one by one."""
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            for future in [pool.submit(node.start) for node in self.nodes]:
                future.result()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        self.ctl(first, "await_online_nodes", str(len(self.nodes)))

    def running_nodes(self) -> int:
        """How many nodes the first running node sees running."""
        live = next(node for node in self.nodes if node.running)
        out = self.ctl(live, "eval", "length(rabbit_nodes:all_running()).")
        return int(out.strip())

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class ReplicatedPostgres(Node):
    """A primary and a synchronous standby (``pg_basebackup -R``); ``fail_over`` promotes it."""

    def __init__(self) -> None:
        self.primary = PrivatePostgres()
        conf = self.primary.data / "postgresql.conf"
        with conf.open("a") as f:  # every commit waits until the standby has it (remote flush)
            f.write("\nsynchronous_standby_names = '*'\nsynchronous_commit = on\n"
                    "wal_level = replica\nmax_wal_senders = 5\nwal_keep_size = '256MB'\n")
        self.standby = PrivatePostgres(initdb=False)
        self.failed_over = False

    def dsn(self, database: str = "postgres") -> str:
        """Both hosts, the writable one chosen at each connect."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    @property
    def current(self) -> PrivatePostgres:
        """The node that takes writes now."""
        return self.standby if self.failed_over else self.primary

    def start(self) -> None:
        self.primary.start()
        self.standby._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port),
                          "-U", "postgres", "-D", str(self.standby.data), "-R", "-X", "stream",
                          "--no-sync", "-c", "fast")
        with (self.standby.data / "postgresql.conf").open("a") as f:
            # Once promoted it has no standby of its own: waiting for one would hang commits.
            f.write("\nsynchronous_standby_names = ''\n")
        self.standby.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the standby counts once it streams, in sync
            state = self.primary._run(
                "psql", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
                "-Atc", "SELECT sync_state FROM pg_stat_replication").stdout.strip()
            if state == "sync":
                return
            time.sleep(0.2)
        raise RuntimeError("the standby never became synchronous")

    def create_database(self, name: str) -> str:
        """CREATE DATABASE on the primary (replicated); returns the multi-host DSN."""
        self.primary.create_database(name)
        return self.dsn(name)

    def fail_over(self) -> float:
        """Crash the primary (``-m immediate``) and promote the standby; returns the seconds
        from the crash until the standby accepts writes."""
        started = time.monotonic()
        self.primary.stop()
        self.standby._run("pg_ctl", "-D", str(self.standby.data), "-w", "-t", "60", "promote")
        self.failed_over = True
        return time.monotonic() - started

    def close(self) -> None:
        self.standby.close()
        self.primary.close()

