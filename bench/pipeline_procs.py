"""The processes of the pipeline benchmark: sandbox, dispatcher, raw consumer, and /proc probes.

Each runs as its own OS process so none shares an event loop (or a core's worth of Python) with
the publisher in the benchmark's own process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.request import Request, urlopen

from prometheus_client.parser import text_string_to_metric_families

from dispatcher.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# A job's stages in a worker, in order, by the histogram that times each.
STAGES = {"queued": "queue_wait", "reserve": "reservation", "slot": "send_slot_wait",
          "send": "send", "record": "record"}


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment ``dispatcher run`` reads: every field as ``DISPATCHER_<NAME>``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    for f in fields(settings):
        env[f"DISPATCHER_{f.name.upper()}"] = str(getattr(settings, f.name))
    return env


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (from /proc/<pid>/stat)."""
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLOCK_TICKS


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this machine (the broker's node), if visible."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields_ = line.split()
                if fields_[3] == "0A" and int(fields_[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields_[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


class ProcessCpu:
    """CPU seconds one outside process (the broker) spent since ``start``; 0 if not found."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._start = 0.0

    def _now(self) -> float:
        if self.pid is None:
            return 0.0
        try:
            return cpu_seconds(self.pid)
        except OSError:
            return 0.0

    def start(self) -> None:
        self._start = self._now()

    def seconds(self) -> float:
        return max(0.0, self._now() - self._start)


def rss_bytes(pid: int) -> int:
    """Resident set size of one process right now (from /proc/<pid>/statm)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES


def http_json(url: str, body: object | None = None, timeout: float = 10.0) -> object:
    """GET (or POST ``body`` as JSON) and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = Request(url, data=data, headers={"Content-Type": "application/json"})
    with urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float = 30) -> None:
    """Wait until ``url`` answers 200, failing early with the log tail if the process died."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {seconds}s:\n{log.read_text()[-3000:]}")


@dataclass
class Child:
    """One subprocess with its log file; stopped with SIGTERM, killed if it will not stop."""

    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=out,
                                         stderr=out)
        return self.proc

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


@dataclass
class Sandbox:
    """``python -m dispatcher.sandbox`` on its own port; scenario changed over its control API."""

    port: int
    account_sid: str
    auth_token: str
    log: Path
    child: Child | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, scenario: dict[str, object]) -> None:
        path = self.log.with_suffix(".scenario.json")
        path.write_text(json.dumps(scenario))
        argv = [sys.executable, "-m", "dispatcher.sandbox", "--port", str(self.port),
                "--account-sid", self.account_sid, "--auth-token", self.auth_token,
                "--scenario", str(path)]
        env = {**os.environ, "DISPATCHER_LOG_LEVEL": "warning"}
        self.child = Child(argv, env, self.log)
        proc = self.child.start()
        wait_http(f"{self.base_url}/_sandbox/scenario", proc, self.log)

    def cpu(self) -> float:
        """CPU seconds the sandbox process used so far."""
        assert self.child is not None
        return cpu_seconds(self.child.pid)

    def configure(self, scenario: dict[str, object]) -> None:
        """Replace the scenario and forget every recorded create (bounds the sandbox's memory)."""
        http_json(f"{self.base_url}/_sandbox/reset", {})
        http_json(f"{self.base_url}/_sandbox/scenario", scenario)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


@dataclass
class Dispatcher:
    """``python -m dispatcher run`` configured by ``DISPATCHER_*`` variables."""

    settings: Settings
    log: Path
    profile: Path | None = None  # run under cProfile, stats written here on exit
    child: Child | None = None
    started_cpu: float = 0.0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, rss bytes)

    def start(self) -> None:
        profile = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
        self.child = Child([sys.executable, *profile, "-m", "dispatcher", "run"],
                           settings_env(self.settings), self.log)
        proc = self.child.start()
        # A loaded host (or cProfile) can take well over the default to start.
        wait_http(f"{self.settings.public_base_url}/readyz", proc, self.log, seconds=120)
        self.started_cpu = cpu_seconds(proc.pid)
        self.samples = []

    def sample(self) -> None:
        """Record the process's RSS now."""
        self.samples.append((time.monotonic(), rss_bytes(self.child_pid)))

    def cpu_since_start(self) -> float:
        return cpu_seconds(self.child_pid) - self.started_cpu

    @property
    def child_pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def stage_means(self) -> dict[str, float]:
        """Mean seconds per job of each handling stage, from the dispatcher's own histograms."""
        with urlopen(f"{self.settings.public_base_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    sums[family.name] = sums.get(family.name, 0.0) + sample.value
                elif sample.name.endswith("_count"):
                    counts[family.name] = counts.get(family.name, 0.0) + sample.value
        return {stage: sums[f"dispatcher_{name}_seconds"] / counts[f"dispatcher_{name}_seconds"]
                for stage, name in STAGES.items() if counts.get(f"dispatcher_{name}_seconds")}

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(timeout=self.settings.shutdown_timeout_seconds + 15)


def run_bare_consumer(module: str, amqp_url: str, queue: str, count: int, prefetch: int,
                      log: Path, extra: tuple[str, ...] = ()) -> dict[str, float]:
    """Run ``bench.pipeline_raw`` or ``bench.pipeline_floor`` in its own process; its report."""
    argv = [sys.executable, "-m", module, "--amqp-url", amqp_url, "--queue", queue,
            "--count", str(count), "--prefetch", str(prefetch), *extra]
    with log.open("ab") as err:
        out = subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.PIPE,
                             stderr=err, timeout=600)
    # The report is the last line: anything the libraries print comes before it.
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert isinstance(report, dict)
    return {str(k): float(v) for k, v in report.items()}
