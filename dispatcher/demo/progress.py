"""Live progress of the demo's broadcast: a bar on a terminal, plain lines otherwise.

Events (paused, topped up, resumed, completed) are always printed on their own line; on a
terminal the bar is redrawn in place, elsewhere a progress line is printed every tenth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TextIO

BAR_WIDTH = 30


@dataclass(frozen=True)
class Snapshot:
    """What the demo reads from the database on each tick."""

    status: str  # the broadcast's status, or "submitted" before the dispatcher stored it
    billable: int
    done: int  # sent or delivered
    delivered: int
    failed: int
    held: int
    paused: bool
    available: int
    topups: int
    topped_up: int  # credits granted by those top-ups


@dataclass
class ProgressView:
    """Turns successive snapshots into a bar and event lines."""

    out: TextIO
    tty: bool
    last: Snapshot | None = None
    events: list[str] = field(default_factory=list)
    _printed_tenth: int = -1
    _bar_drawn: bool = False

    def update(self, now: Snapshot) -> None:
        for line in self._events(self.last, now):
            self._line(line)
            self.events.append(line)
        self.last = now
        if self.tty:
            self._draw(now)
        else:
            tenth = 10 * now.done // now.billable if now.billable else 0
            if tenth > self._printed_tenth:
                self._printed_tenth = tenth
                self._line(_summary(now))

    def finish(self) -> None:
        """End the bar's line so later output starts on a fresh one."""
        if self.tty and self._bar_drawn:
            self.out.write("\n")
            self.out.flush()
            self._bar_drawn = False

    def _events(self, before: Snapshot | None, now: Snapshot) -> list[str]:
        lines: list[str] = []
        if now.paused and not (before and before.paused):
            lines.append(f"paused at zero: {now.held} recipients held in order, "
                         f"available {now.available}; waiting for the auto top-up")
        if before is not None and now.topups > before.topups:
            lines.append(f"auto top-up granted: +{now.topped_up - before.topped_up} credits "
                         f"(top-up #{now.topups})")
        if before is not None and before.paused and not now.paused:
            lines.append(f"resumed: releasing held recipients (available {now.available})")
        if now.status == "completed" and (before is None or before.status != "completed"):
            lines.append("broadcast completed: every recipient handed to the provider")
        return lines

    def _draw(self, s: Snapshot) -> None:
        filled = BAR_WIDTH * s.done // s.billable if s.billable else 0
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self.out.write(f"\r[{bar}] {_summary(s)}\x1b[K")
        self.out.flush()
        self._bar_drawn = True

    def _line(self, text: str) -> None:
        if self.tty and self._bar_drawn:
            self.out.write("\r\x1b[K")
            self._bar_drawn = False
        self.out.write(text + "\n")
        self.out.flush()


def _summary(s: Snapshot) -> str:
    state = "PAUSED" if s.paused else s.status
    return (f"{s.done}/{s.billable} sent, {s.delivered} delivered, {s.held} held, "
            f"balance {s.available}, {state}")
