"""Broadcast pre-flight: what a broadcast would cost, who is skipped, and what to do about it.

A pure read: it never reserves or writes. Built for 100k+ recipients: countries come from a
resolver compiled from libphonenumber's metadata, a template without variables is counted
once, and opted-out numbers are looked up in one query.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from dispatcher.contract import STOP_FOOTER
from dispatcher.numbers import CountryResolver
from dispatcher.pricing import RateTable, count_segments

Advice = Literal["ok", "ok_with_auto_recharge", "enable_auto_recharge", "top_up"]
MAX_SKIPPED_LISTED = 100
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")


@dataclass(frozen=True)
class AutoRecharge:
    enabled: bool
    threshold: int
    amount: int


@dataclass
class CountryLine:
    recipients: int = 0
    segments: int = 0
    credits: int = 0
    rate: int = 0


@dataclass
class PreflightResult:
    """The answer for one broadcast."""

    recipients: int
    billable: int
    segments: int
    credits: int
    by_country: dict[str, CountryLine]
    skipped: dict[str, int]
    skipped_examples: list[dict[str, object]]
    available: int
    shortfall: int
    auto_recharge: AutoRecharge
    auto_recharge_covers: bool
    advice: Advice
    billable_indexes: list[int] = field(default_factory=list, repr=False)
    costs: list[tuple[str, int, int, int]] = field(default_factory=list, repr=False)

    def as_json(self) -> dict[str, object]:
        """The HTTP body (without per-recipient detail)."""
        return {
            "recipients": self.recipients, "billable": self.billable,
            "segments": self.segments, "credits": self.credits,
            "by_country": {c: vars(line) for c, line in sorted(self.by_country.items())},
            "skipped": {**self.skipped, "examples": self.skipped_examples},
            "available": self.available, "shortfall": self.shortfall,
            "auto_recharge": {**vars(self.auto_recharge),
                              "covers_shortfall": self.auto_recharge_covers},
            "advice": self.advice,
        }


class Template:
    """A body template split once into literal and variable parts."""

    def __init__(self, body: str, footer: bool) -> None:
        self.parts: list[tuple[bool, str]] = []
        last = 0
        for match in _PLACEHOLDER.finditer(body):
            self.parts.append((False, body[last:match.start()]))
            token = match.group(0)
            self.parts.append((False, token[0]) if token in ("{{", "}}")
                              else (True, match.group(1)))
            last = match.end()
        self.parts.append((False, body[last:] + (STOP_FOOTER if footer else "")))
        self.static = all(not is_var for is_var, _ in self.parts)

    def render(self, variables: Mapping[str, str]) -> str:
        return "".join(variables.get(text, "") if is_var else text for is_var, text in self.parts)


def advise(shortfall: int, auto: AutoRecharge) -> tuple[Advice, bool]:
    """What to tell the sender, and whether auto-recharge would cover the shortfall."""
    if shortfall <= 0:
        return "ok", True
    if auto.enabled:
        # The billing service sizes one charge to close the shortfall.
        return "ok_with_auto_recharge", True
    return ("enable_auto_recharge" if auto.amount > 0 else "top_up"), False


def preflight(body: str, footer: bool, recipients: Iterable[Mapping[str, object]],
              rates: RateTable, opted_out: set[str], available: int, auto: AutoRecharge,
              resolver: CountryResolver) -> PreflightResult:
    """Price every recipient; skip invalid and opted-out numbers."""
    template = Template(body, footer)
    static_segments = count_segments(template.render({})).segments if template.static else 0
    by_country: dict[str, CountryLine] = {}
    skipped = {"opted_out": 0, "invalid": 0, "duplicate": 0}
    examples: list[dict[str, object]] = []
    seen: set[str] = set()
    billable_indexes: list[int] = []
    costs: list[tuple[str, int, int, int]] = []
    total = segments_total = credits_total = 0
    for index, recipient in enumerate(recipients):
        total += 1
        to = str(recipient.get("to", ""))
        reason = None
        country = resolver.resolve(to)
        if country is None:
            reason = "invalid"
        elif to in opted_out:
            reason = "opted_out"
        elif to in seen:
            reason = "duplicate"
        if reason is not None or country is None:
            skipped[reason or "invalid"] += 1
            if len(examples) < MAX_SKIPPED_LISTED:
                examples.append({"index": index, "reason": reason})
            continue
        seen.add(to)
        if template.static:
            segments = static_segments
        else:
            variables = recipient.get("vars") or {}
            assert isinstance(variables, Mapping)
            segments = count_segments(template.render(variables)).segments
        rate = rates.rate("sms", country)
        line = by_country.get(country)
        if line is None:
            line = by_country[country] = CountryLine(rate=rate)
        line.recipients += 1
        line.segments += segments
        line.credits += segments * rate
        segments_total += segments
        credits_total += segments * rate
        billable_indexes.append(index)
        costs.append((country, segments, rate, segments * rate))
    shortfall = max(0, credits_total - available)
    advice, covers = advise(shortfall, auto)
    return PreflightResult(total, len(billable_indexes), segments_total, credits_total,
                           by_country, skipped, examples, available, shortfall, auto, covers,
                           advice, billable_indexes, costs)
