"""What a broadcast's time means for it: a schedule (today's balance), quiet hours (deferred)."""

from __future__ import annotations

from datetime import datetime

from dispatcher.broadcasts.preflight import PreflightResult
from dispatcher.pricing.quiet_hours import QuietHours, zones_for


def schedule_note(result: PreflightResult, send_at: datetime) -> dict[str, object]:
    """What today's balance covers of a broadcast that is reserved at ``send_at``."""
    per = result.credits / result.billable if result.billable else 0.0
    covered = result.billable if result.shortfall == 0 else min(
        result.billable, int(result.available // per) if per else 0)
    return {"send_at": send_at.isoformat(), "covered_today": covered,
            "note": "credits are reserved at send_at, from the balance then; these figures "
                    "use the balance available now"}


def deferred_at(result: PreflightResult, window: QuietHours,
                 at: datetime) -> dict[str, object]:
    """How many billable recipients the quiet hours would defer at ``at``, and until when."""
    numbers = result.numbers
    deferred, last = 0, None
    for index, number in enumerate(numbers):
        if index in result.skip_reasons:
            continue
        until = window.quiet_until(zones_for(number), at)
        if until is not None:
            deferred += 1
            last = until if last is None or until > last else last
    return {"start": window.start.strftime("%H:%M"), "end": window.end.strftime("%H:%M"),
            "at": at.isoformat(), "deferred": deferred,
            "deferred_until": last.isoformat() if last is not None else None}
