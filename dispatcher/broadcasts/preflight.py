"""Broadcast pre-flight: what a broadcast would cost, who is skipped, and what to do about it.

Validity and canonical form of each number follow the one rule (``canonical_number``).

A pure function of the recipients, the rates, the account's opt-outs and balance: it never
reserves or writes. Built for 100k+ recipients: countries come from the numbers' leading digits
(``CountryResolver.resolve_many``, exact: learned from libphonenumber's metadata), SMS parts are
counted column by column (``Template.segments_of``), and everything else is a pass of C-level
builtins over index-aligned lists.
"""

from __future__ import annotations

import gc
import operator
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import Literal

from dispatcher.pricing.numbers import CountryResolver
from dispatcher.pricing.quotes import RateTable
from dispatcher.pricing.smart_encoding import TABLE as SMART_ENCODING_TABLE
from dispatcher.pricing.templates import Columns, Priced, Template

Advice = Literal["ok", "ok_with_auto_recharge", "enable_auto_recharge", "top_up"]
SkipReason = Literal["invalid", "opted_out", "duplicate", "missing_variable",
                     "country_not_allowed", "price_above_limit"]
SKIP_REASONS: tuple[SkipReason, ...] = ("invalid", "opted_out", "duplicate", "missing_variable",
                                        "country_not_allowed", "price_above_limit")
MAX_SKIPPED_LISTED = 100
MAX_UCS2_LISTED = 50


@dataclass(frozen=True)
class AutoRecharge:
    """The account's auto-recharge settings, as the pre-flight sees them."""

    enabled: bool
    threshold: int
    amount: int


@dataclass(frozen=True)
class Guards:
    """The account's spend guards, as the pre-flight sees them (``None``: that guard is off).

    ``remaining_today``: what the daily cap still allows today (UTC).
    """

    allowed_countries: frozenset[str] | None = None
    max_credits_per_message: int | None = None
    remaining_today: int | None = None


@dataclass(frozen=True)
class FitsToday:
    """How much of the broadcast the daily cap lets go today; the rest is held until the next
    UTC day (recipients are reserved in order, so it is the first ``recipients`` of them)."""

    remaining_today: int
    recipients: int
    credits: int
    held_until_tomorrow: int


@dataclass
class CountryLine:
    """Billable recipients of one country, their SMS parts and credits."""

    recipients: int = 0
    segments: int = 0
    credits: int = 0
    rate: int = 0


@dataclass(frozen=True)
class Recipients:
    """A broadcast's recipients as two index-aligned columns."""

    numbers: Sequence[str]
    variables: Sequence[Mapping[str, str]]

    @classmethod
    def from_dicts(cls, rows: Sequence[Mapping[str, object]]) -> Recipients:
        """From ``[{"to": …, "vars": {…}}]`` (the AMQP broadcast job's form)."""
        numbers = [str(r.get("to", "")) for r in rows]
        variables: list[Mapping[str, str]] = []
        for r in rows:
            found = r.get("vars")
            variables.append(found if isinstance(found, Mapping) else {})
        return cls(numbers, variables)


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
    skip_reasons: dict[int, SkipReason]
    numbers: Sequence[str] = ()  # each recipient in canonical form (an invalid one as given)
    smart_encoding: bool = False
    ucs2_characters: list[str] = field(default_factory=list)
    savings: int = 0
    # A scheduled broadcast: its send_at and what the balance covers today (reserved then).
    schedule: dict[str, object] | None = None
    # The account's quiet hours: recipients that would be deferred if sent at that time.
    quiet_hours: dict[str, object] | None = None
    fits_today: FitsToday | None = None

    def as_json(self) -> dict[str, object]:
        """The HTTP body (without per-recipient detail)."""
        auto = self.auto_recharge
        top_ups = -(-self.shortfall // auto.amount) if auto.enabled and auto.amount > 0 else 0
        return {
            "recipients": self.recipients, "billable": self.billable,
            "segments": self.segments, "credits": self.credits,
            "smart_encoding": self.smart_encoding,
            "ucs2_characters": [_character(c) for c in self.ucs2_characters[:MAX_UCS2_LISTED]],
            "savings": self.savings,
            "by_country": {c: vars(line) for c, line in sorted(self.by_country.items())},
            "skipped": {**self.skipped, "examples": self.skipped_examples},
            "available": self.available, "shortfall": self.shortfall,
            "auto_recharge": {**vars(auto), "covers_shortfall": self.auto_recharge_covers,
                              "top_ups_needed": top_ups},
            "advice": self.advice,
            "schedule": self.schedule, "quiet_hours": self.quiet_hours,
            "fits_today": None if self.fits_today is None else vars(self.fits_today),
        }


def _character(char: str) -> dict[str, object]:
    """A character that forces UCS-2, named for the sender."""
    return {"character": char, "code_point": f"U+{ord(char):04X}",
            "name": unicodedata.name(char, ""),
            "smart_encodable": char in SMART_ENCODING_TABLE}


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC around CPU-bound work that allocates 100k+ acyclic objects.

    Nothing awaits inside, so no other task runs meanwhile; the collector resumes after.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def advise(shortfall: int, auto: AutoRecharge) -> tuple[Advice, bool]:
    """What to tell the sender, and whether auto-recharge would cover the shortfall."""
    if shortfall <= 0:
        return "ok", True
    if auto.enabled and auto.amount > 0:
        # Each time the balance runs out the account pauses, is topped up by ``amount`` and
        # resumes, until the broadcast is paid for.
        return "ok_with_auto_recharge", True
    return ("enable_auto_recharge" if auto.amount > 0 else "top_up"), False


def _skips(recipients: Recipients, countries: Sequence[str | None], opted_out: set[str],
           columns: Columns) -> dict[int, SkipReason]:
    """Why each skipped recipient is skipped (the first reason that applies).

    Each check first asks a C-level question of the whole column (``None in``, ``isdisjoint``,
    ``len(set(…))``, whether a variable's column is complete) and finds the affected rows with
    ``compress`` only when some are.
    """
    numbers = recipients.numbers
    rows = range(len(numbers))
    skips: dict[int, SkipReason] = {}
    if None in countries:
        skips = dict.fromkeys(compress(rows, map(operator.is_, countries, repeat(None))),
                              "invalid")
    if not opted_out.isdisjoint(numbers):
        for i in compress(rows, map(opted_out.__contains__, numbers)):
            skips.setdefault(i, "opted_out")
    if len(set(numbers)) != len(numbers):
        first = dict(zip(reversed(numbers), reversed(rows), strict=True))
        for i in compress(rows, map(operator.ne, map(first.__getitem__, numbers), rows)):
            skips.setdefault(i, "duplicate")
    for name in columns.incomplete:
        for i in compress(rows, map(operator.is_, columns.values[name], repeat(None))):
            skips.setdefault(i, "missing_variable")
    return skips


def _segments_by_country(billed: Sequence[str | None], parts: Sequence[int],
                         ) -> tuple[dict[str | None, int], Counter[str | None]]:
    """SMS parts and recipients per country: most messages have the same number of parts, so
    count countries once (C-level) and walk only the rows that differ from the usual count."""
    counts = Counter(billed)
    usual = max(set(parts), key=parts.count) if parts else 0
    by_segments: defaultdict[str | None, int] = defaultdict(int)
    for country, n in counts.items():
        by_segments[country] = n * usual
    for i in compress(range(len(parts)), map(operator.ne, parts, repeat(usual))):
        by_segments[billed[i]] += parts[i] - usual
    return by_segments, counts


def _by_country(billed: Sequence[str | None], parts: Sequence[int],
                rates: RateTable) -> dict[str, CountryLine]:
    """Recipients, SMS parts and credits of each country's billable recipients."""
    by_segments, counts = _segments_by_country(billed, parts)
    by_country: dict[str, CountryLine] = {}
    for country, segments in by_segments.items():
        if country is not None:
            rate = rates.rate("sms", country)
            by_country[country] = CountryLine(counts[country], segments, segments * rate, rate)
    return by_country


def _savings(template: Template, recipients: Recipients, columns: Columns,
             billed: Sequence[str | None], rates: RateTable, credits: int,
             priced: Priced) -> int:
    """Credits the broadcast would cost less with the characters that force UCS-2 left out."""
    if not priced.ucs2:
        return 0
    without = priced.without_ucs2
    if not isinstance(without, dict):
        if without is None:
            plain = template.without("".join(priced.ucs2))
            without = plain.segments_of(plain.adopt(columns), recipients.variables)
        return credits - sum(line.credits for line in _by_country(billed, without, rates).values())
    saved = 0
    for row, fewer in without.items():
        country = billed[row]
        if country is not None:
            saved += (priced.parts[row] - fewer) * rates.rate("sms", country)
    return saved


def _guard_skips(skips: dict[int, SkipReason], countries: Sequence[str | None],
                 parts: Sequence[int], rates: RateTable, guards: Guards) -> None:
    """Add the recipients the spend guards refuse (walks the rows only when one is set)."""
    allowed, most = guards.allowed_countries, guards.max_credits_per_message
    if allowed is None and most is None:
        return
    for i, country in enumerate(countries):
        if i in skips or country is None:
            continue
        if allowed is not None and country not in allowed:
            skips[i] = "country_not_allowed"
        elif most is not None and max(parts[i] * rates.rate("sms", country), 1) > most:
            skips[i] = "price_above_limit"


def _fits_today(billed: Sequence[str | None], parts: Sequence[int], rates: RateTable,
                remaining: int) -> FitsToday:
    """The first billable recipients whose credits the daily cap still allows today."""
    credits = recipients = 0
    total = sum(1 for c in billed if c is not None)
    for country, n in zip(billed, parts, strict=True):
        if country is None:
            continue
        cost = max(n * rates.rate("sms", country), 1)
        if credits + cost > remaining:
            break
        credits += cost
        recipients += 1
    return FitsToday(remaining, recipients, credits, total - recipients)


def preflight(template: Template, recipients: Recipients, rates: RateTable,
              opted_out: set[str], available: int, auto: AutoRecharge,
              resolver: CountryResolver,
              countries: Sequence[str | None] | None = None,
              guards: Guards | None = None) -> PreflightResult:
    """Price every recipient; skip invalid, opted-out, repeated and incomplete ones.

    The template says whether Smart Encoding is on: the figures are the text as sent.
    Numbers are compared in canonical form (``canonical_number``: ``+920300…`` and
    ``+92300…`` are one recipient); ``opted_out`` holds canonical numbers. ``countries``: what
    ``resolver.resolve_canonical`` gave for ``recipients.numbers``, when they are canonical.
    """
    if countries is None:
        countries, numbers = resolver.resolve_canonical(recipients.numbers)
        recipients = Recipients(numbers, recipients.variables)
    columns = template.columns(recipients.variables)
    skips = _skips(recipients, countries, opted_out, columns)
    priced = template.price(columns, recipients.variables)
    guards = guards or Guards()
    _guard_skips(skips, countries, priced.parts, rates, guards)
    billed = list(countries)
    for i in skips:
        billed[i] = None
    by_country = _by_country(billed, priced.parts, rates)
    credits = sum(line.credits for line in by_country.values())
    shortfall = max(0, credits - available)
    advice, covers = advise(shortfall, auto)
    skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
    for reason in skips.values():
        skipped[reason] += 1
    examples: list[dict[str, object]] = [
        {"index": i, "reason": skips[i]} for i in sorted(skips)[:MAX_SKIPPED_LISTED]]
    return PreflightResult(
        len(countries), len(countries) - len(skips),
        sum(line.segments for line in by_country.values()), credits, by_country, skipped,
        examples, available, shortfall, auto, covers, advice, skips, recipients.numbers,
        template.smart_encoding, priced.ucs2,
        _savings(template, recipients, columns, billed, rates, credits, priced),
        fits_today=None if guards.remaining_today is None
        else _fits_today(billed, priced.parts, rates, guards.remaining_today))
