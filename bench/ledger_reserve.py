"""Credit reservations per second: the project's own code beside a pgbench ceiling (issue 2).

Run as ``python -m bench.ledger_reserve [--runs 3] [--seconds 10] [--what-if] [--record]``.

It creates a throw-away database (``dispatcher_bench_<random>``), applies the migrations, creates
and funds the accounts through the project's own functions, measures three scenarios and drops the
database again. Every scenario is measured twice in each run, at concurrency 32:

* **ours**: ``CreditStore(pool)`` over the project's asyncpg pool (32 connections), 32 asyncio tasks
  on uvloop when it is installed; only rows that came back ``reserved`` are counted.
* **pgbench** (the ceiling): ``pgbench -M prepared -c 32 -j 2 -T <seconds> -n`` running the same
  ``reserve_batch`` SQL; reservations are counted from the ``reservations`` table afterwards, and
  the rate is pgbench's tps (without connection time) times reservations per transaction.

Scenarios: (1) single-job ``reserve`` on one hot account, (2) single-job ``reserve`` on a random one
of 10,000 accounts, (3) ``reserve_many`` in batches of 100 on one hot account. Before every
measurement the reservation, ledger and outbox tables are truncated, a checkpoint is taken and the
database is vacuumed and analysed, so runs do not grow the tables or inherit each other's dead rows.
The order (ours first or pgbench first) alternates between runs. Medians over the runs are reported.

``--what-if`` adds rows: (ours only) scenario 2 over a pool without asyncpg's reset on release and
scenario 3 without the client-side coalescing of ``reserve_many`` (``dispatcher.credits.coalesce``);
(pgbench only) scenario 3 against migration 0001's ``reserve_batch``, the "before" figure.
``--hot-index`` swaps the bucket index for one without a predicate on ``remaining`` (and a lower
fillfactor) in the throw-away database, so bucket updates can be HOT; ``--coalesce-limit`` sets
the most jobs one shared batch may carry. ``--record`` replaces this benchmark's section of
``bench/RESULTS.md``, keeping the hand-written findings between its ``<!-- findings -->`` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import platform
import random
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from dispatcher.credits.coalesce import MAX_JOBS
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.db import create_pool
from dispatcher.migrate import migrate
from dispatcher.settings import Settings

CONCURRENCY = 32
BATCH = 100
SPREAD_ACCOUNTS = 10_000
HOT = "hot"
HOT_FUNDS = 10**12
SPREAD_FUNDS = 10**9
RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Ledger reservations (issue 2)"
FINDINGS_START = "<!-- findings -->"
FINDINGS_END = "<!-- /findings -->"
# Single-job paths must reach this fraction of their pgbench ceiling; batches this many per second.
SINGLE_RATIO_TARGET = 0.6
BATCH_RATE_TARGET = 20_000
# The statement CreditStore runs (dispatcher/sql/ledger.sql, "reserve_batch"), spelled for pgbench.
PGBENCH_SELECT = "SELECT job_id, status, amount, available FROM reserve_batch"

# Settled history of an idle account, reinserted after every truncation (see ``reset``).
SEED = "seed"
SEED_ROWS = 50_000
SEED_SQL = f"""
INSERT INTO reservations (job_id, account_id, amount, sub_part, period_seq, status, captured,
                          settled_at)
SELECT 'seed-' || g, '{SEED}', 1, 0, 0, 'captured', 1, now()
  FROM generate_series(1, {SEED_ROWS}) AS g;
INSERT INTO ledger (account_id, kind, reference, reserved_delta, amount, job_id)
SELECT '{SEED}', 'capture', 'seed:' || g, 0, 1, 'seed-' || g
  FROM generate_series(1, {SEED_ROWS}) AS g;
"""

T = TypeVar("T")
# --what-if also installs 0001's reserve_batch under this name: "before", measured in the same run.
OLD_FUNCTION = "reserve_batch_0001"


def spread_account(i: int) -> str:
    return f"a{i}"


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    single_job: bool
    pgbench_script: Callable[[str], str]
    ours: bool = True  # False: a what-if measured with pgbench only
    pgbench: bool = True  # False: a what-if of our side only
    pool_reset: bool = True  # False: our side over a pool that skips asyncpg's reset on release
    coalesce: bool = True  # False: our side with reserve_many's coalescing switched off

    @property
    def batch(self) -> bool:
        return not self.single_job


def _single_script(account_sql: str, prelude: str = "") -> Callable[[str], str]:
    def script(tag: str) -> str:
        return (
            f"{prelude}\\set r random(1, 1000000000000)\n"
            f"{PGBENCH_SELECT}({account_sql}, "
            f"ARRAY['{tag}-' || :client_id || '-' || :r], ARRAY[1]::bigint[]);\n"
        )
    return script


def _batch_script(function: str = "reserve_batch") -> Callable[[str], str]:
    select = PGBENCH_SELECT.replace("reserve_batch", function)

    def script(tag: str) -> str:
        return (
            "\\set r random(1, 1000000000000)\n"
            f"{select}('{HOT}', "
            f"ARRAY(SELECT '{tag}-' || :client_id || '-' || :r || '-' || g "
            f"FROM generate_series(1, {BATCH}) AS g), array_fill(1::bigint, ARRAY[{BATCH}]));\n"
        )
    return script


SCENARIOS = [
    Scenario("hot", "1. `reserve`, one hot account", True, _single_script(f"'{HOT}'")),
    Scenario("spread", f"2. `reserve`, {SPREAD_ACCOUNTS:,} accounts (random)", True,
             _single_script("'a' || :a", f"\\set a random(0, {SPREAD_ACCOUNTS - 1})\n")),
    Scenario("batch", f"3. `reserve_many` x{BATCH}, one hot account", False, _batch_script()),
]
WHAT_IFS = [Scenario(
    "noreset", "2'. what-if: scenario 2, pool without asyncpg's per-release reset (ours only)",
    True, SCENARIOS[1].pgbench_script, pgbench=False, pool_reset=False), Scenario(
    "nocoal", "3'. what-if: scenario 3 without coalescing `reserve_many` calls (ours only)",
    False, SCENARIOS[2].pgbench_script, pgbench=False, coalesce=False), Scenario(
    "old", "3''. before: scenario 3 with 0001's per-job `reserve_batch` (pgbench only)",
    False, _batch_script(OLD_FUNCTION), ours=False)]



def old_reserve_batch_sql() -> str:
    """Migration 0001's ``reserve_batch`` (replaced by 0006), verbatim but for its name."""
    text = resources.files("dispatcher").joinpath(
        "sql", "migrations", "0001_ledger.sql").read_text(encoding="utf-8")
    match = re.search(r"CREATE FUNCTION reserve_batch\(.*?\nEND \$\$;", text, re.DOTALL)
    if match is None:
        raise RuntimeError("reserve_batch not found in 0001_ledger.sql")
    return match.group(0).replace("FUNCTION reserve_batch(", f"FUNCTION {OLD_FUNCTION}(", 1)


# --hot-index: no index mentions ``remaining`` (0001's partial index does, in its predicate, which
# rules out HOT updates) and pages keep room for new versions. Applied before any bucket exists.
HOT_INDEX_SQL = """
DROP INDEX credit_buckets_spendable;
CREATE INDEX credit_buckets_account ON credit_buckets (account_id, id);
ALTER TABLE credit_buckets SET (fillfactor = 50);
"""


@dataclass
class Measure:
    reservations: int
    seconds: float
    other: int = 0  # rows that were not new reservations (should be 0)
    client_cpu: float = 0.0  # CPU seconds of the client (this process, or pgbench)
    busy: float = 0.0  # share of the machine's CPU time that was busy, 0..1

    @property
    def cpu_us(self) -> float:
        """Client CPU microseconds per reservation."""
        return self.client_cpu / self.reservations * 1e6 if self.reservations else 0.0

    @property
    def rate(self) -> float:
        return self.reservations / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Figures:
    ours: list[float] = field(default_factory=list)
    pgbench: list[float] = field(default_factory=list)
    ours_cpu: list[Measure] = field(default_factory=list)
    pgbench_cpu: list[Measure] = field(default_factory=list)

    def cpu(self) -> str:
        """Median client CPU per reservation and machine busy share, ours | pgbench."""
        def one(ms: list[Measure]) -> str:
            if not ms:
                return "—"
            us = statistics.median(m.cpu_us for m in ms)
            busy = statistics.median(m.busy for m in ms)
            return f"{us:,.0f} µs, {busy:.0%}"
        return f"{one(self.ours_cpu)} \\| {one(self.pgbench_cpu)}"

    @property
    def ours_median(self) -> float:
        return statistics.median(self.ours) if self.ours else 0.0

    @property
    def pgbench_median(self) -> float:
        return statistics.median(self.pgbench) if self.pgbench else 0.0

    @property
    def ratio(self) -> float:
        return self.ours_median / self.pgbench_median if self.pgbench_median else 0.0


# --- database lifecycle -------------------------------------------------------------------------

def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def bounded_gather(items: list[T], fn: Callable[[T], Awaitable[Any]],
                         limit: int = CONCURRENCY) -> None:
    queue = list(reversed(items))

    async def worker() -> None:
        while queue:
            await fn(queue.pop())

    await asyncio.gather(*(worker() for _ in range(limit)))


async def setup(pool: asyncpg.Pool) -> None:
    """Create and fund the hot account and the spread accounts with the project's functions."""
    store = CreditStore(pool)
    await create_account(pool, SEED)
    await create_account(pool, HOT)
    await store.grant(HOT, HOT_FUNDS, "purchase", "bench-hot")
    names = [spread_account(i) for i in range(SPREAD_ACCOUNTS)]

    async def open_and_fund(name: str) -> None:
        await create_account(pool, name)
        await store.grant(name, SPREAD_FUNDS, "purchase", f"bench-{name}")

    await bounded_gather(names, open_and_fund)


async def reset(pool: asyncpg.Pool) -> None:
    """Empty the tables the reservations grow, reseed a background, checkpoint, vacuum, analyse.

    The background matters: ANALYZE of an *empty* ``reservations`` table makes every new plan of
    ``reserve_batch``'s "does this job id exist" lookup a sequential scan, which the connection's
    plpgsql plan cache then keeps while the table grows — quadratic, and not what production sees.
    """
    # A benchmark database only: the ledger refuses TRUNCATE (migration 0020) unless its guard
    # is switched off around it.
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE ledger DISABLE TRIGGER ledger_no_truncate")
        await conn.execute("TRUNCATE reservations, ledger, outbox")
        await conn.execute("ALTER TABLE ledger ENABLE TRIGGER ledger_no_truncate")
    await pool.execute(SEED_SQL)
    await pool.execute("CHECKPOINT")
    await pool.execute("VACUUM ANALYZE")


async def reservation_count(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM reservations")
    return count


# --- CPU accounting -----------------------------------------------------------------------------

@dataclass(frozen=True)
class CpuMark:
    machine_busy: int
    machine_total: int
    own: float
    children: float


def cpu_mark() -> CpuMark:
    """Machine-wide jiffies from /proc/stat and this process's and its children's CPU seconds."""
    busy = total = 0
    with contextlib.suppress(OSError):
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        total = sum(fields[:8])
        busy = total - fields[3] - fields[4]  # minus idle and iowait
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuMark(busy, total, own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime)


def with_cpu(m: Measure, before: CpuMark, *, children: bool) -> Measure:
    after = cpu_mark()
    total = after.machine_total - before.machine_total
    m.busy = (after.machine_busy - before.machine_busy) / total if total else 0.0
    m.client_cpu = (after.children - before.children if children else after.own - before.own)
    return m


# --- our code -----------------------------------------------------------------------------------

async def _keep_session(conn: asyncpg.Connection) -> None:
    """A pool ``reset`` that sends nothing (asyncpg's default sends four statements)."""


@contextlib.asynccontextmanager
async def measured_pool(dsn: str, scenario: Scenario,
                        coalesce_limit: int) -> AsyncIterator[asyncpg.Pool]:
    """A 32-connection pool for one measurement of our side, warmed on its scenario for 1 s.

    The project's pool (``dispatcher.db.create_pool``), or, for ``pool_reset=False``, the same
    settings with a ``reset`` that sends nothing. Opened per measurement so that our 32
    connections and pgbench's 32 are never open at once (max_connections is shared).
    """
    settings = Settings(database_url=dsn)
    pool: asyncpg.Pool | None
    if scenario.pool_reset:
        pool = await create_pool(settings, min_size=CONCURRENCY, max_size=CONCURRENCY)
    else:
        pool = await asyncpg.create_pool(
            dsn, min_size=CONCURRENCY, max_size=CONCURRENCY, timeout=10,
            command_timeout=settings.db_command_timeout_seconds, reset=_keep_session,
            server_settings={"application_name": "dispatcher", "tcp_keepalives_idle": "30",
                             "tcp_keepalives_interval": "10", "tcp_keepalives_count": "3"})
    assert pool is not None
    try:
        await run_ours(pool, scenario, f"w{secrets.token_hex(3)}", 1.0, coalesce_limit)
        yield pool
    finally:
        await pool.close()


async def run_ours(pool: asyncpg.Pool, scenario: Scenario, tag: str, seconds: float,
                   coalesce_limit: int = MAX_JOBS) -> Measure:
    store = CreditStore(pool, coalesce=scenario.coalesce, coalesce_limit=coalesce_limit)
    rng = random.Random(tag)
    counts = [[0, 0] for _ in range(CONCURRENCY)]

    async def worker(w: int, deadline: float) -> None:
        i = 0
        tally = counts[w]
        while time.perf_counter() < deadline:
            i += 1
            if scenario.batch:
                jobs = [(f"{tag}-{w}-{i}-{k}", 1) for k in range(BATCH)]
                batch = await store.reserve_many(HOT, jobs)
                tally[0] += len(batch.reserved)
                tally[1] += len(jobs) - len(batch.reserved)
            else:
                account = (HOT if scenario.key == "hot"
                           else spread_account(rng.randrange(SPREAD_ACCOUNTS)))
                reservation = await store.reserve(f"{tag}-{w}-{i}", account, 1)
                tally[0 if reservation.new else 1] += 1

    mark = cpu_mark()
    start = time.perf_counter()
    await asyncio.gather(*(worker(w, start + seconds) for w in range(CONCURRENCY)))
    elapsed = time.perf_counter() - start
    return with_cpu(Measure(sum(c[0] for c in counts), elapsed, sum(c[1] for c in counts)),
                    mark, children=False)


# --- pgbench ------------------------------------------------------------------------------------

def pgbench_command(dsn: str, script: Path, seconds: int) -> tuple[list[str], dict[str, str]]:
    parts = urlsplit(dsn)
    cmd = ["pgbench", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432),
           "-U", parts.username or "postgres", "-M", "prepared", "-c", str(CONCURRENCY),
           "-j", "2", "-T", str(seconds), "-n", "-f", str(script), parts.path.lstrip("/")]
    env = dict(os.environ)
    if parts.password:
        env["PGPASSWORD"] = parts.password
    return cmd, env


async def run_pgbench(pool: asyncpg.Pool, dsn: str, scenario: Scenario, tag: str,
                      seconds: int, workdir: Path) -> Measure:
    script = workdir / f"{tag}.sql"
    script.write_text(scenario.pgbench_script(tag), encoding="utf-8")
    cmd, env = pgbench_command(dsn, script, seconds)
    before = await reservation_count(pool)
    mark = cpu_mark()
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_b, err_b = await proc.communicate()
    cpu = with_cpu(Measure(0, 0.0), mark, children=True)
    out = out_b.decode() + err_b.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed ({proc.returncode}):\n{out}")
    after = await reservation_count(pool)
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if not processed or not tps:
        raise RuntimeError(f"cannot parse pgbench output:\n{out}")
    txns = int(processed.group(1))
    rows = after - before
    per_txn = BATCH if scenario.batch else 1
    # Seconds such that rows / seconds = tps x (rows per transaction): pgbench's own clock.
    elapsed = txns / float(tps.group(1))
    other = txns * per_txn - rows + (int(failed.group(1)) if failed else 0)
    return Measure(rows, elapsed, other, cpu.client_cpu, cpu.busy)


# --- reporting ----------------------------------------------------------------------------------

def fmt(rate: float) -> str:
    return f"{rate:,.0f}"


def verdicts(figures: dict[str, Figures]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for scenario in SCENARIOS:
        f = figures.get(scenario.key)
        if f is None:
            continue
        if scenario.single_job:
            out.append((f"{scenario.title}: ours/pgbench ≥ {SINGLE_RATIO_TARGET} "
                        f"(measured {f.ratio:.2f})", f.ratio >= SINGLE_RATIO_TARGET))
        else:
            out.append((f"{scenario.title}: ≥ {BATCH_RATE_TARGET:,} reservations/s "
                        f"(measured {fmt(f.ours_median)})", f.ours_median >= BATCH_RATE_TARGET))
    return out


def table(figures: dict[str, Figures], scenarios: list[Scenario]) -> str:
    lines = [
        "| Scenario | ours (res/s, median) | pgbench ceiling (res/s, median) | ours / pgbench "
        "| ours per run | pgbench per run | client CPU/res, machine busy: ours \\| pgbench |",
        "|---|--:|--:|--:|---|---|---|",
    ]
    for scenario in scenarios:
        f = figures[scenario.key]
        ours = fmt(f.ours_median) if f.ours else "—"
        ceiling = fmt(f.pgbench_median) if f.pgbench else "—"
        ratio = f"{f.ratio:.2f}" if f.ours and f.pgbench else "—"
        lines.append(
            f"| {scenario.title} | {ours} | {ceiling} | {ratio} "
            f"| {', '.join(fmt(x) for x in f.ours) or '—'} "
            f"| {', '.join(fmt(x) for x in f.pgbench) or '—'} | {f.cpu()} |")
    return "\n".join(lines)


def machine() -> str:
    model = "unknown CPU"
    ram = "unknown RAM"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs (nproc), {model}, {ram}"


def versions(server_version: str) -> str:
    try:
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        loop = "asyncio (uvloop not installed)"
    pgbench = subprocess.run(["pgbench", "--version"], capture_output=True, text=True,
                             check=False).stdout.strip()
    return (f"Python {platform.python_version()}, PostgreSQL {server_version}, "
            f"asyncpg {asyncpg.__version__}, {loop}, {pgbench}")


def section(figures: dict[str, Figures], scenarios: list[Scenario], args: argparse.Namespace,
            server_version: str, settings: str, findings: str) -> str:
    flags = "".join([" --what-if" if args.what_if else "", " --hot-index" if args.hot_index else "",
                     f" --coalesce-limit {args.coalesce_limit}"
                     if args.coalesce_limit != MAX_JOBS else ""])
    proto_note = ("""
- What-if rows (our side only): (2') scenario 2 through `CreditStore` over a pool with the same
  settings but `reset=` a no-op coroutine instead of asyncpg's default `pg_advisory_unlock_all();
  CLOSE ALL; UNLISTEN *; RESET ALL` round trip on every release; (3') scenario 3 with
  `CreditStore(pool, coalesce=False)`: every `reserve_many` call its own round trip, as pgbench
  does. (3'') pgbench as in scenario 3, against migration 0001's `reserve_batch` (one
  `credits_take` per job), installed under another name in the throw-away database: the
  "before" figure, measured in the same run.""" if args.what_if else "")
    hot_note = ("""
- `--hot-index`: `HOT_INDEX_SQL` in `bench/ledger_reserve.py` (bucket index without a predicate
  on `remaining`, fillfactor 50) applied to the throw-away database.""" if args.hot_index else "")
    targets = "\n".join(f"- {'met' if ok else '**missed**'}: {text}"
                        for text, ok in verdicts(figures))
    return f"""{SECTION}

Recorded {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} with
`python -m bench.ledger_reserve --runs {args.runs} --seconds {args.seconds}{flags} --record`.

- Machine: {machine()} — shared and noisy: compare ratios measured in the same run.
- Versions: {versions(server_version)}.
- Server settings: {settings}.
- Method: concurrency 32 everywhere. *ours* = `CreditStore(pool).reserve` / `.reserve_many` over
  the project's pool (`dispatcher.db.create_pool`, 32 connections, opened and warmed for 1 s
  before each measurement), 32 asyncio tasks, one process; only rows returned `reserved`
  count. `reserve_many` coalesces concurrent calls for one account (at most
  {args.coalesce_limit} jobs per round trip); pgbench cannot, so scenario 3's ratio is not a
  ceiling ratio. *pgbench* = `pgbench -M prepared -c 32 -j 2 -T {args.seconds} -n`
  running the same `reserve_batch` statement (batch ids built server-side with
  `generate_series`); reservations counted from the `reservations` table (tps x reservations
  per transaction). Accounts funded with purchased credits (one bucket each), 1 credit per job,
  unique job ids. Before each measurement: `TRUNCATE reservations, ledger, outbox`, reinsert
  {SEED_ROWS:,} settled reservations and ledger rows of an idle account (so the tables are not
  analysed empty), `CHECKPOINT`, `VACUUM ANALYZE`. Medians of {args.runs} runs x {args.seconds} s;
  the order (ours or pgbench first) alternates per run.{proto_note}{hot_note}

{table(figures, scenarios)}

Targets:
{targets}

{FINDINGS_START}
{findings.strip()}
{FINDINGS_END}
"""


def record(text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (or append it), leaving others alone."""
    current = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    start = current.find(SECTION)
    if start < 0:
        RESULTS.write_text(current.rstrip() + "\n\n" + text, encoding="utf-8")
        return
    nxt = re.search(r"^## ", current[start + len(SECTION):], re.MULTILINE)
    end = start + len(SECTION) + nxt.start() if nxt else len(current)
    rest = current[end:]
    RESULTS.write_text(current[:start] + text + ("\n" + rest if rest else ""), encoding="utf-8")


def previous_findings() -> str:
    if not RESULTS.exists():
        return ""
    current = RESULTS.read_text(encoding="utf-8")
    start = current.find(SECTION)
    if start < 0:
        return ""
    a = current.find(FINDINGS_START, start)
    b = current.find(FINDINGS_END, start)
    if a < 0 or b < 0:
        return ""
    return current[a + len(FINDINGS_START):b]


# --- main ---------------------------------------------------------------------------------------

async def bench(args: argparse.Namespace) -> dict[str, Figures]:
    if shutil.which("pgbench") is None:
        raise SystemExit("pgbench is not installed")
    scenarios = [*SCENARIOS, *WHAT_IFS] if args.what_if else list(SCENARIOS)
    if args.only:
        keys = set(args.only.split(","))
        scenarios = [s for s in scenarios if s.key in keys]
    name = f"dispatcher_bench_{secrets.token_hex(4)}"
    dsn = with_database(args.dsn, name)
    await create_database(args.dsn, name)
    print(f"database {name}", file=sys.stderr)
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await migrate(conn)
            if args.hot_index:
                await conn.execute(HOT_INDEX_SQL)
            if args.what_if:
                await conn.execute(old_reserve_batch_sql())
            server_version: str = await conn.fetchval("SHOW server_version")
            settings = ", ".join([
                f"{k}={await conn.fetchval(f'SHOW {k}')}"
                for k in ("shared_buffers", "synchronous_commit", "fsync", "max_connections")])
        finally:
            await conn.close()
        # Setup, resets and counts only; each measurement of ours opens its own pool.
        pool = await create_pool(Settings(database_url=dsn), min_size=1, max_size=8)
        try:
            t0 = time.perf_counter()
            await setup(pool)
            print(f"setup {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            figures = {s.key: Figures() for s in scenarios}
            with tempfile.TemporaryDirectory() as tmp:
                for run in range(args.runs):
                    for scenario in scenarios:
                        order = ("ours", "pgbench") if run % 2 == 0 else ("pgbench", "ours")
                        for side in (s for s in order if getattr(scenario, s)):
                            tag = f"r{run}{scenario.key[0]}{side[0]}"
                            if side == "ours":
                                async with measured_pool(dsn, scenario,
                                                         args.coalesce_limit) as ours:
                                    await reset(pool)
                                    m = await run_ours(ours, scenario, tag, args.seconds,
                                                       args.coalesce_limit)
                                figures[scenario.key].ours.append(m.rate)
                                figures[scenario.key].ours_cpu.append(m)
                            else:
                                await reset(pool)
                                m = await run_pgbench(pool, dsn, scenario, tag, args.seconds,
                                                      Path(tmp))
                                figures[scenario.key].pgbench.append(m.rate)
                                figures[scenario.key].pgbench_cpu.append(m)
                            note = f" ({m.other} not reserved!)" if m.other else ""
                            print(f"run {run + 1} {scenario.key:6} {side:7} "
                                  f"{fmt(m.rate):>8} res/s, client {m.cpu_us:5.0f} µs/res, "
                                  f"machine {m.busy:4.0%} busy{note}", file=sys.stderr)
            await reset(pool)
        finally:
            await pool.close()
    finally:
        await drop_database(args.dsn, name)
    print(table(figures, scenarios))
    print()
    for text, ok in verdicts(figures):
        print(f"{'met   ' if ok else 'MISSED'} {text}")
    if args.record:
        record(section(figures, scenarios, args, server_version, settings, previous_findings()))
        print(f"\nrecorded in {RESULTS}", file=sys.stderr)
    return figures


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--dsn", default=os.environ.get(
        "BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a database to connect to for CREATE/DROP DATABASE (default: %(default)s)")
    parser.add_argument("--record", action="store_true",
                        help=f"replace the section {SECTION!r} in {RESULTS.name}")
    parser.add_argument("--what-if", action="store_true",
                        help="also measure: no pool reset, no coalescing, 0001's reserve_batch")
    parser.add_argument("--hot-index", action="store_true",
                        help="bucket index without a predicate on remaining, fillfactor 50")
    parser.add_argument("--coalesce-limit", type=int, default=MAX_JOBS,
                        help="most jobs in one shared reserve_many batch (default: %(default)s)")
    parser.add_argument("--only", default="",
                        help="comma-separated scenario keys to measure (hot, spread, batch, "
                             "noreset, nocoal, old); default all")
    args = parser.parse_args(argv)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    run_loop(bench(args))


if __name__ == "__main__":
    main()
