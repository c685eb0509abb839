"""What a broadcast's time means for it: a schedule (today's balance), quiet hours (deferred)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

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


# Numbers looked up at most by one pre-flight: beyond, an even sample of the list (~1 s).
MAX_LOOKUPS = 5000


def deferred_at(result: PreflightResult, window: QuietHours,
                at: datetime) -> dict[str, object]:
    """How many billable recipients the quiet hours would defer at ``at``, and until when.

    A number's zones can take libphonenumber ~0.2 ms (``zones_for``): past ``MAX_LOOKUPS``
    billable recipients, an even sample of them is looked up and the count scaled
    (``estimated``). The runner looks every recipient up when it sends.
    """
    billable = [n for i, n in enumerate(result.numbers) if i not in result.skip_reasons]
    stride = max(1, -(-len(billable) // MAX_LOOKUPS))
    sample = billable[::stride]
    until_by_zones: dict[tuple[ZoneInfo, ...], datetime | None] = {}
    deferred, last = 0, None
    for number in sample:
        zones = zones_for(number)
        if zones not in until_by_zones:
            until_by_zones[zones] = window.quiet_until(zones, at)
        until = until_by_zones[zones]
        if until is not None:
            deferred += 1
            last = until if last is None or until > last else last
    if stride > 1:
        deferred = round(deferred * len(billable) / len(sample))
    return {"start": window.start.strftime("%H:%M"), "end": window.end.strftime("%H:%M"),
            "at": at.isoformat(), "deferred": deferred, "estimated": stride > 1,
            "deferred_until": last.isoformat() if last is not None else None}
