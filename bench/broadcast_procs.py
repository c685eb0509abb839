"""What the broadcast benchmarks share: a scratch database, subprocesses, recipients, /proc probes.

The dispatcher and the sandbox run as their own OS processes (``python -m dispatcher run``,
``python -m dispatcher.sandbox``), so none shares an event loop with the benchmark's client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path

import asyncpg
import phonenumbers

from bench.pipeline_procs import wait_http
from dispatcher.migrate import migrate
from dispatcher.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
REGIONS = ("US", "GB", "DE", "FR", "IN", "BR", "MX", "ES", "IT", "NL", "AU", "CA", "JP", "ZA",
           "NG", "PL", "SE", "TR", "AR", "PH")
FIRST_NAMES = ("Ana", "Ben", "Chloé", "Dmitri", "Émile", "Fatima", "Gus", "Hana", "Ivan", "José",
               "Kai", "Lena", "Mia", "Noah", "Olivia", "Pablo", "Quinn", "Rosa", "Sam", "Zoë")


def out_dir() -> Path:
    """``bench/out`` (git-ignored): logs and profiles of the benchmark's subprocesses."""
    path = ROOT / "bench" / "out"
    path.mkdir(exist_ok=True)
    return path


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment ``dispatcher run`` reads: every field as ``DISPATCHER_<NAME>``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    for f in fields(settings):
        env[f"DISPATCHER_{f.name.upper()}"] = str(getattr(settings, f.name))
    return env


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLOCK_TICKS


def memory_kib(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak resident set) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@dataclass
class Child:
    """One subprocess with its log file; SIGTERM, then SIGKILL if it will not stop."""

    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_url: str) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=out,
                                         stderr=out, stdin=subprocess.DEVNULL)
        wait_http(ready_url, self.proc, self.log, seconds=60)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def dispatcher_child(settings: Settings, log: Path) -> Child:
    """``python -m dispatcher run`` (uvloop), ready when ``/healthz`` answers."""
    return Child([sys.executable, "-m", "dispatcher", "run"], settings_env(settings), log)


def sandbox_child(port: int, account_sid: str, auth_token: str, log: Path,
                  scenario: dict[str, object] | None = None) -> Child:
    """``python -m dispatcher.sandbox`` on ``port``."""
    # 64 callback workers, as Twilio does not wait for one callback to send the next: with the
    # default 8, the sandbox's full callback queue would hold creates back.
    argv = [sys.executable, "-m", "dispatcher.sandbox", "--port", str(port), "--account-sid",
            account_sid, "--auth-token", auth_token, "--callback-workers", "64"]
    if scenario is not None:
        path = log.with_suffix(".scenario.json")
        path.write_text(json.dumps(scenario))
        argv += ["--scenario", str(path)]
    return Child(argv, {**os.environ, "DISPATCHER_LOG_LEVEL": "warning"}, log)


@dataclass(frozen=True)
class Scratch:
    """A freshly migrated database for one benchmark run."""

    url: str
    name: str
    admin_url: str


async def scratch_database(base: Settings, label: str) -> Scratch:
    """Create and migrate ``dispatcher_bench_<label>_<random>``."""
    name = f"dispatcher_bench_{label}_{uuid.uuid4().hex[:8]}"
    admin_url = base.database_url.rsplit("/", 1)[0] + "/postgres"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = base.database_url.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return Scratch(url, name, admin_url)


async def drop_database(scratch: Scratch) -> None:
    admin = await asyncpg.connect(scratch.admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{scratch.name}" WITH (FORCE)')
    finally:
        await admin.close()


def bench_settings(base: Settings, scratch: Scratch, label: str, **changes: object) -> Settings:
    port = free_port()
    values: dict[str, object] = {
        "database_url": scratch.url, "amqp_prefix": f"bench-{label}-{uuid.uuid4().hex[:6]}",
        "http_port": port, "public_base_url": f"http://127.0.0.1:{port}",
        "log_format": "json", "log_level": "warning", **changes}
    return replace(base, **values)  # type: ignore[arg-type]


def numbers(count: int, regions: tuple[str, ...] = REGIONS) -> list[str]:
    """``count`` distinct valid mobile numbers spread evenly over ``regions`` (phonenumbers)."""
    per_region = -(-count // len(regions))
    found: list[str] = []
    for region in regions:
        example = phonenumbers.example_number_for_type(region,
                                                       phonenumbers.PhoneNumberType.MOBILE)
        assert example is not None
        assert example.national_number is not None
        step = got = 0
        while got < per_region:
            step += 1
            candidate = phonenumbers.PhoneNumber(country_code=example.country_code,
                                                 national_number=example.national_number + step)
            if phonenumbers.is_valid_number(candidate):
                found.append(phonenumbers.format_number(candidate,
                                                        phonenumbers.PhoneNumberFormat.E164))
                got += 1
    return found[:count]


def personalised(count: int, regions: tuple[str, ...] = REGIONS) -> list[dict[str, object]]:
    """Distinct recipients, each with its own name and code (one in 50 names is UCS-2)."""
    people: list[dict[str, object]] = []
    for i, number in enumerate(numbers(count, regions)):
        name = f"{FIRST_NAMES[i % len(FIRST_NAMES)]} {i}" + (" 李" if i % 50 == 0 else "")
        people.append({"to": number, "vars": {"name": name, "code": f"{i * 7919 % 10**6:06d}"}})
    return people


def replace_section(results: Path, heading: str, text: str) -> None:
    """Replace (or append) one ``## heading`` section of RESULTS.md, leaving the rest alone."""
    current = results.read_text(encoding="utf-8") if results.exists() else "# Benchmarks\n"
    start = current.find(f"\n## {heading}\n")
    block = f"\n## {heading}\n\n{text.strip()}\n"
    if start < 0:
        updated = current.rstrip("\n") + "\n" + block
    else:
        end = current.find("\n## ", start + 1)
        updated = current[:start] + block + (current[end:] if end >= 0 else "")
    results.write_text(updated, encoding="utf-8")
