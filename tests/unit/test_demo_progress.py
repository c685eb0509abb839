"""The demo's progress view: a bar redrawn in place on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io

import pytest

from dispatcher.demo.progress import ProgressView, Snapshot
from dispatcher.demo.report import key_metric_lines
from dispatcher.demo.setup import DemoFailed, database_url, demo_recipients, extra_recipients


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def snap(done: int, *, held: int = 0, paused: bool = False, topups: int = 0,
         status: str = "running", available: int = 100) -> Snapshot:
    return Snapshot(status, 1000, done, done, 0, held, paused, available, topups, 700 * topups)


STORY = [snap(0), snap(100, topups=1), snap(500, topups=1),
         snap(900, held=100, paused=True, topups=1, available=0),
         snap(900, held=100, paused=True, topups=2), snap(1000, topups=2, status="completed")]


def test_plain_output_has_one_line_per_tenth_and_every_event() -> None:
    out = io.StringIO()
    view = ProgressView(out, tty=False)
    for s in STORY:
        view.update(s)
    view.finish()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines == [
        "0/1000 sent, 0 delivered, 0 held, balance 100, running",
        "auto top-up granted: +700 credits (top-up #1)",
        "100/1000 sent, 100 delivered, 0 held, balance 100, running",
        "500/1000 sent, 500 delivered, 0 held, balance 100, running",
        "paused at zero: 100 recipients held in order, available 0; waiting for the auto top-up",
        "900/1000 sent, 900 delivered, 100 held, balance 0, PAUSED",
        "auto top-up granted: +700 credits (top-up #2)",
        "resumed: releasing held recipients (available 100)",
        "broadcast completed: every recipient handed to the provider",
        "1000/1000 sent, 1000 delivered, 0 held, balance 100, completed",
    ]
    assert view.events[0].startswith("auto top-up") and len(view.events) == 5


def test_a_terminal_gets_a_bar_redrawn_in_place_and_events_above_it() -> None:
    out = Terminal()
    view = ProgressView(out, tty=True)
    for s in STORY:
        view.update(s)
    view.finish()
    text = out.getvalue()
    assert "\r[" + "#" * 15 + "-" * 15 + "] 500/1000 sent" in text
    assert "\r[" + "#" * 30 + "] 1000/1000 sent" in text
    # An event clears the bar's line first, so it never ends up glued to the bar.
    assert "\r\x1b[Kpaused at zero" in text
    assert text.endswith("\n")


def test_demo_recipients_are_distinct_and_the_extras_are_the_skipped_kinds() -> None:
    recipients = demo_recipients(2000)
    numbers = [r["to"] for r in recipients]
    assert len(set(numbers)) == 2000
    assert {n[:3] for n in numbers} == {"+14", "+33", "+49", "+34"}
    extras = extra_recipients("+14155559998", numbers[0])
    assert [r["to"] for r in extras][2:] == ["+14155559998", numbers[0]]


def test_the_demo_database_url_only_accepts_demo_names() -> None:
    assert database_url("postgresql://postgres@127.0.0.1:5432/dispatcher", "dispatcher_demo") == (
        "postgresql://postgres@127.0.0.1:5432/dispatcher_demo")
    for bad in ("postgres", "dispatcher", 'demo"; DROP', "Demo"):
        with pytest.raises(DemoFailed):
            database_url("postgresql://postgres@127.0.0.1/x", bad)


def test_key_metric_lines_quote_the_summary_series() -> None:
    text = ('# TYPE dispatcher_credits_total counter\n'
            'dispatcher_credits_total{operation="captured"} 600.0\n'
            'dispatcher_credits_total{operation="granted"} 800.0\n')
    assert key_metric_lines(text) == ['dispatcher_credits_total{operation="captured"} 600',
                                      'dispatcher_credits_total{operation="granted"} 800']
