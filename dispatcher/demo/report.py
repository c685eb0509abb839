"""What the demo shows: the pre-flight answer, live progress, and the closing summary."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.broadcasts.preflight import PreflightResult
from dispatcher.broadcasts.runner import Progress, progress
from dispatcher.credits.audit import format_report, run_audit
from dispatcher.demo.processes import Children
from dispatcher.demo.progress import ProgressView, Snapshot
from dispatcher.queries import q

Say = Callable[[str], None]
TICK_SECONDS = 0.2
# The metric lines the summary quotes (name, labels).
KEY_METRICS = (
    ("dispatcher_jobs_total", {"kind": "sms", "outcome": "sent"}),
    ("dispatcher_credits_total", {"operation": "reserved"}),
    ("dispatcher_credits_total", {"operation": "captured"}),
    ("dispatcher_credits_total", {"operation": "granted"}),
    ("dispatcher_low_balance_events_total", {"type": "balance_low"}),
    ("dispatcher_low_balance_events_total", {"type": "balance_depleted"}),
)


def print_preflight(say: Say, r: PreflightResult) -> None:
    """The pre-flight answer, the way a broadcast sender would read it."""
    say("pre-flight:")
    say(f"  recipients {r.recipients}: {r.billable} billable, skipped "
        + ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in r.skipped.items()))
    countries = ", ".join(f"{c} {line.recipients} x {line.rate} = {line.credits}"
                          for c, line in sorted(r.by_country.items()))
    say(f"  cost {r.credits} credits ({r.segments} segments): {countries}")
    say(f"  available {r.available}, shortfall {r.shortfall}, auto-recharge "
        f"{'on' if r.auto_recharge.enabled else 'off'} (below {r.auto_recharge.threshold} "
        f"add {r.auto_recharge.amount}) -> advice: {r.advice}")


@dataclass
class DemoReport:
    """Follows one broadcast in the database until it completes."""

    say: Say
    pool: asyncpg.Pool
    account: str
    broadcast_id: str
    children: Children
    out: TextIO
    view: ProgressView = field(init=False)
    last: Progress | None = None
    elapsed: float = 0.0

    def __post_init__(self) -> None:
        self.view = ProgressView(self.out, self.out.isatty())

    async def follow(self, seconds: float) -> bool:
        """Show progress until every billable recipient is settled; False on timeout."""
        started = time.monotonic()
        try:
            while time.monotonic() - started < seconds:
                self.children.check_alive()
                snap = await self.snapshot()
                self.view.update(snap)
                if snap.status == "completed" and snap.delivered + snap.failed >= snap.billable:
                    self.elapsed = time.monotonic() - started
                    return True
                await asyncio.sleep(TICK_SECONDS)
        finally:
            self.view.finish()
        self.elapsed = time.monotonic() - started
        self.say(f"timed out after {seconds:.0f}s")
        return False

    async def snapshot(self) -> Snapshot:
        p = await progress(self.pool, self.broadcast_id)
        state = await self.pool.fetchrow(q("demo_account_state"), self.account)
        topups = await self.pool.fetch(q("demo_topups"), self.account)
        assert state is not None
        self.last = p
        if p is None:
            return Snapshot("submitted", 0, 0, 0, 0, 0, state["paused"], state["available"],
                            len(topups), sum(t["amount"] for t in topups))
        return Snapshot(p.status, p.total - p.skipped, p.sent + p.delivered, p.delivered,
                        p.failed, p.held, state["paused"], state["available"], len(topups),
                        sum(t["amount"] for t in topups))


async def print_summary(report: DemoReport, pre: PreflightResult, metrics_text: str,
                        base_url: str, log_dir: Path, elapsed: float) -> bool:
    """The closing summary; True when the ledger audit is clean."""
    say, pool, p = report.say, report.pool, report.last
    violations = await run_audit(pool)
    accounts = int(await pool.fetchval("SELECT count(*) FROM accounts"))
    topups = await pool.fetch(q("demo_topups"), report.account)
    state = await pool.fetchrow(q("demo_account_state"), report.account)
    assert state is not None
    pauses = sum(line.startswith("paused") for line in report.view.events)
    say("summary:")
    if p is not None:
        say(f"  sent             {p.sent + p.delivered} of {pre.billable} billable "
            f"({p.delivered} delivered, {p.failed} failed) in {report.elapsed:.1f}s")
        say(f"  credits spent    {p.credits_spent} (pre-flight estimate {pre.credits})")
    say(f"  top-ups charged  {len(topups)}: "
        + (", ".join(f"+{t['amount']}" for t in topups) or "none")
        + (f"; paused {pauses} time(s), resumed by itself" if pauses else "; never paused"))
    say(f"  balance now      {state['available']} available, {state['reserved']} reserved")
    say(f"  ledger audit     {'OK' if not violations else 'FAILED'}: "
        + format_report(violations, accounts).splitlines()[0])
    say(f"  metrics          {base_url}/metrics while it ran; snapshot {log_dir}/metrics.txt")
    for line in key_metric_lines(metrics_text):
        say(f"                   {line}")
    say(f"  logs             {log_dir} (JSON lines); total {elapsed:.1f}s")
    return not violations


def key_metric_lines(text: str) -> list[str]:
    """``name{labels} value`` for the KEY_METRICS found in an exposition text."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    lines = []
    for name, labels in KEY_METRICS:
        value = samples.get((name, tuple(sorted(labels.items()))))
        if value is not None:
            shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{shown}}} {value:g}")
    return lines
