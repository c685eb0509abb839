"""Figures of the pipeline benchmark, its targets, and its section of ``bench/RESULTS.md``."""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import platform
import re
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.ledger_reserve import machine

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Dispatch pipeline (issue 3)"
PRIORITY_SECTION = "## Dispatch pipeline: transactional behind a bulk backlog (issue 3)"
FINDINGS_START = "<!-- pipeline findings -->"
FINDINGS_END = "<!-- /pipeline findings -->"
LATENCY_MS = 100
ZERO_RATIO_TARGET = 0.5
LATENCY_TARGET = 0.9
RSS_GROWTH_LIMIT = 1.10  # last-quarter peak at most 10 % above the first quarter's
PRIORITY_P99_TARGET = 0.5  # seconds: "a fraction of a second"


def scenario(latency_ms: int, callbacks: bool) -> dict[str, object]:
    """The sandbox scenario of one phase."""
    return {"latency_ms": latency_ms, "callbacks_enabled": callbacks}


@dataclass(frozen=True)
class Drained:
    """One backlog drained by the dispatcher."""

    rate: float
    cpu_us: float
    sandbox_cpu_us: float
    samples: list[tuple[float, int]]
    stages: dict[str, float] = field(default_factory=dict)  # mean seconds per job, by stage


@dataclass
class Figures:
    """Everything measured, per run where there are runs."""

    zero: list[float] = field(default_factory=list)
    zero_cpu: list[float] = field(default_factory=list)
    sandbox_cpu: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    raw_cpu: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)  # consume + one twilio create + ack
    floor_cpu: list[float] = field(default_factory=list)
    floor_sandbox_cpu: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)  # at --latency-in-flight
    latency_full: list[float] = field(default_factory=list)  # at --in-flight
    stages: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # scenario -> runs
    rss_rate: float = 0.0
    rss: list[tuple[float, int]] = field(default_factory=list)
    probes: list[float] = field(default_factory=list)
    probe_depths: list[int] = field(default_factory=list)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def quarter_peaks(samples: list[tuple[float, int]]) -> tuple[int, int]:
    """Peak RSS in the first and in the last quarter of the sampled time."""
    if not samples:
        return 0, 0
    start, end = samples[0][0], samples[-1][0]
    quarter = (end - start) / 4
    first = max(rss for t, rss in samples if t <= start + quarter)
    last = max(rss for t, rss in samples if t >= end - quarter)
    return first, last


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def latency_summary(values: list[float]) -> str:
    if not values:
        return "no probe was published (backlog too small?)"
    return (f"{len(values)} jobs, p50 {percentile(values, 50) * 1000:.0f} ms, "
            f"p99 {percentile(values, 99) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms")


def verdicts(f: Figures, args: argparse.Namespace) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    if f.zero and f.raw:
        ratio = median(f.zero) / median(f.raw)
        floor = (f"; the floor — consume, one twilio create, ack, nothing else — "
                 f"{median(f.floor) / median(f.raw):.2f}x") if f.floor else ""
        out.append((f"zero latency: ≥ {ZERO_RATIO_TARGET}x the broker ceiling "
                    f"(measured {ratio:.2f}x{floor})", ratio >= ZERO_RATIO_TARGET))
    if f.latency:
        slots = in_flight(args, args.latency_in_flight)
        bound = slots / (LATENCY_MS / 1000)
        share = median(f.latency) / bound
        out.append((f"{LATENCY_MS} ms latency: ≥ {LATENCY_TARGET:.0%} of {slots} in "
                    f"flight / {LATENCY_MS} ms = {bound:,.0f} jobs/s (measured {share:.0%})",
                    share >= LATENCY_TARGET))
    if f.rss:
        first, last = quarter_peaks(f.rss)
        out.append((f"peak RSS flat over {args.rss_jobs:,} jobs: last-quarter peak ≤ "
                    f"{RSS_GROWTH_LIMIT:.2f}x the first quarter's (measured "
                    f"{last / first:.2f}x)", last <= first * RSS_GROWTH_LIMIT))
    if f.probes:
        p99 = percentile(f.probes, 99)
        out.append((f"transactional behind a ≥ {args.backlog:,} bulk backlog: p99 ≤ "
                    f"{PRIORITY_P99_TARGET * 1000:.0f} ms (measured {p99 * 1000:.0f} ms)",
                    p99 <= PRIORITY_P99_TARGET))
    return out


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values) or "—"


def in_flight(args: argparse.Namespace, per_process: int | None = None) -> int:
    """Provider calls in flight over every competing dispatcher process."""
    slots = args.in_flight if per_process is None else per_process
    return int(slots) * int(getattr(args, "dispatchers", 1))


def stages_text(stages: dict[str, float]) -> str:
    """``queued 2.1 ms, reserve 19.8 ms, ...``: where a job's time in the dispatcher went."""
    return ", ".join(f"{stage} {seconds * 1000:.1f} ms" for stage, seconds in stages.items())


def median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per stage, the median over runs of the mean time per job."""
    return {stage: median([run[stage] for run in runs if stage in run])
            for stage in (runs[0] if runs else {})}


def table(f: Figures, args: argparse.Namespace) -> str:
    bound = in_flight(args) / (LATENCY_MS / 1000)
    rows = [
        "| Measurement | median | per run | reference | ratio |",
        "|---|--:|---|--:|--:|",
    ]
    if f.zero:
        ratio = median(f.zero) / median(f.raw) if f.raw else 0.0
        rows.append(f"| zero latency, dispatcher (jobs/s) | {median(f.zero):,.0f} "
                    f"| {fmt(f.zero)} | {median(f.raw):,.0f} (raw consume+ack) "
                    f"| {ratio:.2f} |")
        rows.append(f"| zero latency, raw aio-pika consume+ack (msg/s) | {median(f.raw):,.0f} "
                    f"| {fmt(f.raw)} | — | — |")
        if f.floor:
            rows.append(f"| zero latency, floor: consume + twilio create + ack (msg/s) "
                        f"| {median(f.floor):,.0f} | {fmt(f.floor)} | {median(f.raw):,.0f} "
                        f"(raw consume+ack) | {median(f.floor) / median(f.raw):.2f} |")
            rows.append(f"| CPU per message, floor process / sandbox (µs) "
                        f"| {median(f.floor_cpu):,.0f} / {median(f.floor_sandbox_cpu):,.0f} "
                        f"| {fmt(f.floor_cpu)} / {fmt(f.floor_sandbox_cpu)} | — | — |")
        rows.append(f"| CPU per job, zero latency: dispatcher process (µs) "
                    f"| {median(f.zero_cpu):,.0f} | {fmt(f.zero_cpu)} "
                    f"| {median(f.raw_cpu):,.0f} (raw loop, per message) "
                    f"| {median(f.zero_cpu) / max(median(f.raw_cpu), 1):.1f} |")
        rows.append(f"| CPU per job, zero latency: sandbox process (µs) "
                    f"| {median(f.sandbox_cpu):,.0f} | {fmt(f.sandbox_cpu)} | — | — |")
    if f.latency:
        slots = in_flight(args, args.latency_in_flight)
        target_bound = slots / (LATENCY_MS / 1000)
        rows.append(f"| {LATENCY_MS} ms latency, {slots} in flight, dispatcher (jobs/s) "
                    f"| {median(f.latency):,.0f} | {fmt(f.latency)} | {target_bound:,.0f} "
                    f"(in flight / latency) | {median(f.latency) / target_bound:.2f} |")
    if f.latency_full:
        rows.append(f"| {LATENCY_MS} ms latency, {in_flight(args)} in flight, dispatcher (jobs/s)"
                    f" | {median(f.latency_full):,.0f} | {fmt(f.latency_full)} | {bound:,.0f} "
                    f"(in flight / latency) | {median(f.latency_full) / bound:.2f} |")
    for scenario, runs in f.stages.items():
        rows.append(f"| time per job in the dispatcher, {scenario} "
                    f"| {stages_text(median_stages(runs))} | — | — | — |")
    if f.rss:
        first, last = quarter_peaks(f.rss)
        rows.append(f"| {args.rss_jobs:,}-job drain (jobs/s) | {f.rss_rate:,.0f} | — | — | — |")
        rows.append(f"| peak RSS, first / last quarter (MiB) | {first / 2**20:.1f} / "
                    f"{last / 2**20:.1f} | {len(f.rss)} samples | — | {last / first:.2f} |")
    if f.probes:
        rows.append(f"| transactional publish → sent behind the bulk backlog "
                    f"| {latency_summary(f.probes)} | queued bulk at publish: "
                    f"{min(f.probe_depths):,}-{max(f.probe_depths):,} | — | — |")
    return "\n".join(rows)


def versions(server_version: str) -> str:
    names = ("aio-pika", "aiormq", "asyncpg", "aiohttp", "twilio", "pydantic", "uvloop")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return (f"Python {platform.python_version()}, PostgreSQL {server_version}, "
            f"RabbitMQ {rabbitmq_version()}, " + ", ".join(found))


def rabbitmq_version() -> str:
    path = Path("/usr/lib/rabbitmq/lib")
    found = sorted(p.name.removeprefix("rabbitmq_server-") for p in path.glob("rabbitmq_server-*"))
    return found[-1] if found else "?"


def command(args: argparse.Namespace) -> str:
    parts = ["python -m bench.pipeline", f"--runs {args.runs}", f"--jobs {args.jobs}",
             f"--latency-jobs {args.latency_jobs}", f"--rss-jobs {args.rss_jobs}"]
    if args.latency_in_flight != 50:
        parts.append(f"--latency-in-flight {args.latency_in_flight}")
    if args.callbacks:
        parts.append("--callbacks")
    if getattr(args, "dispatchers", 1) != 1:
        parts.append(f"--dispatchers {args.dispatchers}")
    return " ".join([*parts, "--record"])


def section(f: Figures, args: argparse.Namespace, server_version: str) -> str:
    targets = "\n".join(f"- {'met' if ok else '**missed**'}: {text}"
                        for text, ok in verdicts(f, args))
    callbacks = ("on (the sandbox POSTs signed status callbacks the dispatcher settles)"
                 if args.callbacks else "off (statuses still progress in the sandbox; nothing "
                 "is POSTed back, so only the send path is measured)")
    return f"""{SECTION}

Recorded {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} with `{command(args)}`.

- Machine: {machine()} — shared with other work: compare figures measured in the same run.
- Versions: {versions(server_version)}.
- Method: three processes — `python -m dispatcher run` ({getattr(args, "dispatchers", 1)} competing
  process(es), CPU per job summed over them; configured by `DISPATCHER_*`:
  prefetch {args.prefetch}, {args.in_flight} provider calls in flight each (twice as many
  workers), default pool, JSON logs at
  `{args.log_level}`, per-sender limit lifted because every job uses one sending number), the
  sandbox (`python -m dispatcher.sandbox`, callbacks {callbacks}), and the benchmark, which only
  publishes and watches. Fresh database and AMQP prefix, removed afterwards. Each measurement
  publishes a backlog of one-segment SMS jobs (persistent, confirmed; {args.accounts} funded
  accounts round-robin) while no dispatcher runs, starts the dispatcher and waits until all are
  `sent`: rate = jobs / (last `sent_at` - first `created_at`) from the job rows. The ceiling is
  `bench/pipeline_raw.py` (own process, uvloop, same quorum queue and prefetch, one `ack` per
  message) draining the same number of the same messages; the floor is `bench/pipeline_floor.py`
  (the same, plus one `messages.create_async` of the official twilio library to the sandbox per
  message before its ack: what no dispatcher can skip). The three rotate order between runs;
  CPU of the raw and floor loops counts from their first delivery.
  Medians of {args.runs} runs: {args.jobs:,} jobs at zero latency, {args.latency_jobs:,} with
  {LATENCY_MS} ms added to every create, at {args.latency_in_flight} and at {args.in_flight}
  provider calls in flight. Per-stage times are the dispatcher's own histograms (sum / count).
  Memory: one {args.rss_jobs:,}-job backlog, the
  dispatcher's RSS sampled every 0.25 s (`/proc/<pid>/statm`), peak of the first vs the last
  quarter of the drain. Priority: during that drain, while ≥ {args.backlog:,} bulk jobs were still
  queued, {args.probes} transactional jobs (20 other accounts) published one every
  {args.probe_interval * 1000:.0f} ms; latency = `sent_at` - the moment before publishing.

{table(f, args)}

Targets:
{targets}

{FINDINGS_START}
{previous_findings().strip()}
{FINDINGS_END}
"""


def previous_findings() -> str:
    if not RESULTS.exists():
        return ""
    current = RESULTS.read_text(encoding="utf-8")
    a, b = current.find(FINDINGS_START), current.find(FINDINGS_END)
    return current[a + len(FINDINGS_START):b] if 0 <= a < b else ""


def priority_section(f: Figures, args: argparse.Namespace, server_version: str) -> str:
    """The section of ``--priority-only``: probes behind a deep bulk backlog."""
    targets = "\n".join(f"- {'met' if ok else '**missed**'}: {text}"
                        for text, ok in verdicts(f, args))
    rows = "| Measurement | result | queued bulk jobs at each publish |\n|---|---|---|\n"
    if f.probes:
        rows += (f"| transactional publish → sent | {latency_summary(f.probes)} "
                 f"| {min(f.probe_depths):,}-{max(f.probe_depths):,} |")
    return f"""{PRIORITY_SECTION}

Recorded {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} with `python -m bench.pipeline
--priority-only --backlog {args.backlog} --probes {args.probes} --record`.

- Machine: {machine()} — shared with other work.
- Versions: {versions(server_version)}.
- Method: {args.backlog:,} + 20,000 one-segment bulk SMS jobs ({args.accounts} accounts) published
  (confirmed) while no dispatcher runs; then `python -m dispatcher run` (own process, prefetch
  {args.prefetch}, {args.in_flight} in flight, sandbox at zero latency in its own process) starts
  draining them. Once the first bulk job is sent, {args.probes} transactional jobs of 20 other
  accounts (round-robin) are published one every {args.probe_interval * 1000:.0f} ms, each only
  while at least {args.backlog:,} bulk jobs are still queued at the broker (checked by a passive
  declare just before); latency = the job's `sent_at` - the moment before publishing it. The
  backlog is not drained: the dispatcher is stopped after the probes and the queues deleted.

{rows}

Targets:
{targets}
"""


def record(text: str, section: str = SECTION) -> None:
    """Replace this benchmark's section of RESULTS.md (or append it), leaving others alone."""
    current = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    start = current.find(section + "\n")
    if start < 0:
        RESULTS.write_text(current.rstrip() + "\n\n" + text, encoding="utf-8")
        return
    nxt = re.search(r"^## ", current[start + len(section):], re.MULTILINE)
    end = start + len(section) + nxt.start() if nxt else len(current)
    rest = current[end:]
    RESULTS.write_text(current[:start] + text + ("\n" + rest if rest else ""), encoding="utf-8")
