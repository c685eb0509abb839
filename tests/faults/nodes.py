"""Private PostgreSQL and RabbitMQ nodes that a fault test may stop, kill and restart.

The shared services (PostgreSQL on 5432, RabbitMQ on 5672) are used by every test run on the
machine and must never be stopped; a fault test starts its own node instead, on free ports and
in a temporary directory, and does what it likes with it::

    with PrivatePostgres() as pg:                # initdb + start (~6 s)
        dsn = pg.create_database("dispatcher")   # postgresql://postgres@127.0.0.1:<port>/...
        pg.stop()                                # pg_ctl stop -m immediate: a crash
        pg.start()                               # same data directory, same port

    with PrivateRabbitMQ() as mq:                # rabbitmq-server, its own node name (~10-60 s)
        mq.url                                   # amqp://guest:guest@127.0.0.1:<port>/
        mq.kill9()                               # SIGKILL to the whole node (beam, epmd child…)
        mq.start()                               # same Mnesia directory: durable queues survive

Both stop and delete everything on ``close()`` (or leaving the ``with``). PostgreSQL refuses to
run as root: as root, ``initdb`` and ``pg_ctl`` run as the ``postgres`` user (``runuser``).
RabbitMQ ignores ``/etc/rabbitmq``: the node gets its own config (only its listener), an empty
env file and plugin list, and ``HOME`` in the temporary directory (its Erlang cookie).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Self

POSTGRES_USER = "postgres"
START_TIMEOUT_SECONDS = 60.0
RABBITMQ_START_TIMEOUT_SECONDS = 180.0  # ~40 s measured on a busy 2-core host


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:``port``."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def postgres_bindir() -> Path:
    """The newest installed PostgreSQL's binaries (Debian: /usr/lib/postgresql/<v>/bin)."""
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and (Path(out.stdout.strip()) / "initdb").exists():
            return Path(out.stdout.strip())
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if not versions:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    return versions[-1].parent


class Node:
    """A server started on entering a ``with`` block and closed on leaving it, or at once
    if it fails to start (a half-started node leaves nothing behind)."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class PrivatePostgres(Node):
    """One PostgreSQL cluster of our own: initdb'd in a temporary directory, on a free port."""

    def __init__(self, port: int | None = None, *, initdb: bool = True,
                 options: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        # More ``-c name=value`` settings (tests/cluster: replication); without ``initdb`` the
        # data directory is filled by the caller (a standby's pg_basebackup).
        self.options = options
        self.root = Path(tempfile.mkdtemp(prefix="private-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._bindir = postgres_bindir()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            entry = pwd.getpwnam(POSTGRES_USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        if initdb:
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E",
                      "UTF8", "--no-sync", "--no-instructions")

    def dsn(self, database: str = "postgres") -> str:
        """A libpq URL for ``database`` on this node (user postgres, trust auth)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Start (or restart) the node on its port; returns once it accepts connections."""
        # fsync off is safe against what these tests do (kill the server, not the host: the
        # kernel still holds the writes); synchronous_commit stays on, or a crash would lose
        # commits already acknowledged — a test would see the harness lose data, not the code.
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c full_page_writes=off"
                   + "".join(f" -c {option}" for option in self.options))
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w",
                  "-t", str(int(START_TIMEOUT_SECONDS)), "start")

    def stop(self, mode: str = "immediate") -> None:
        """``pg_ctl stop -m immediate`` by default: every backend dies at once, like a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def running(self) -> bool:
        """True while the postmaster runs."""
        result = self._run("pg_ctl", "-D", str(self.data), "status", check=False)
        return result.returncode == 0

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name``; returns its DSN."""
        self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                  "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def close(self) -> None:
        """Stop the node if it runs and delete its directory."""
        if self.data.exists() and self.running:
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self._bindir / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", POSTGRES_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                cwd=self.root, timeout=START_TIMEOUT_SECONDS + 30)
        if check and result.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr}\n{log}")
        return result


class PrivateRabbitMQ(Node):
    """One RabbitMQ node of our own (``<name>@localhost``), on free ports, killable with -9."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dist_port = free_port()
        self.name = f"fault{uuid.uuid4().hex[:8]}@localhost"
        self.root = Path(tempfile.mkdtemp(prefix="private-rabbit-"))
        self.log = self.root / "server.log"
        (self.root / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The AMQP URL (guest may log in over loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update({
            "HOME": str(self.root),  # the node's Erlang cookie lives here
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        })
        return env

    def start(self) -> None:
        """Start (or restart) the node; returns once its AMQP port accepts connections."""
        server = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        if not server.exists():  # not Debian's layout: the one on PATH
            server = Path(shutil.which("rabbitmq-server") or "rabbitmq-server")
        with self.log.open("ab") as log:
            # A session of its own: kill9 signals the whole group (the script, beam, children).
            self._proc = subprocess.Popen([str(server)], env=self._env(), cwd=self.root,
                                          stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + RABBITMQ_START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited ({self._proc.returncode}):\n"
                                   + self.log.read_text()[-3000:])
            if port_open(self.port):
                return
            time.sleep(0.25)
        self.kill9()
        raise RuntimeError("rabbitmq-server did not open its port in time:\n"
                           + self.log.read_text()[-3000:])

    def kill9(self) -> None:
        """SIGKILL every process of the node at once: no clean shutdown, like a host crash."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self._proc = None
        deadline = time.monotonic() + 30  # the group's other processes die a moment later
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        """True while the node's process runs."""
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Kill the node and delete its directory."""
        self.kill9()
        shutil.rmtree(self.root, ignore_errors=True)
