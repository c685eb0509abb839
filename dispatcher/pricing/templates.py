"""Broadcast body templates: ``{name}`` placeholders, rendering, and SMS parts for many at once.

``Template.segments`` gives, for every recipient, exactly what ``count_segments(render(vars))``
would, without rendering or counting each message in Python: the literal text is classified
once, each variable's values are scanned as one joined string, and lengths are summed column by
column. A value with a character outside GSM-7 makes its message UCS-2 of the same length; only
messages with a character that takes two units (GSM-7 extension characters, characters outside
the BMP) or that may join its neighbours into one user-perceived character (combining marks,
ZWJ, regional indicators…: a part boundary never splits one) are counted one by one, and of
those in UCS-2 only the ones longer than one part. ``Template.price`` also names the characters
that force UCS-2 and what each message would take without them, from the same scans. A template
with Smart Encoding on renders, and so prices, the encoded text.
"""

from __future__ import annotations

import operator
import re
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, compress
from typing import Literal, cast

from dispatcher.pricing.quotes import (
    GSM7_BASIC,
    GSM7_EXTENDED,
    JOINERS,
    LIMITS,
    MAY_JOIN,
    Encoding,
    count_segments,
)
from dispatcher.pricing.smart_encoding import SMART_TRANSLATION

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")
_NOT_BASIC = re.compile(f"[^{re.escape(GSM7_BASIC)}]")
_NOT_GSM = re.compile(f"[^{re.escape(GSM7_BASIC + GSM7_EXTENDED)}]")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")

_ASCII_BASIC = bytes(c for c in range(128) if chr(c) in GSM7_BASIC)
_ASCII_GSM = bytes(c for c in range(128) if chr(c) in GSM7_BASIC + GSM7_EXTENDED)
_EXTENDED = frozenset(GSM7_EXTENDED)
_SEPARATOR = "\n"  # any character: rows are found by offsets, never by splitting
Literals = Literal["basic", "extended", "ucs2", "joining", "astral"]

# Appended to a body whose job asks for the opt-out footer (counted in its segments).
STOP_FOOTER = "\nReply STOP to unsubscribe"


def _literal_class(text: str) -> Literals:
    """How the fixed text of a template constrains every message made from it."""
    if _NOT_BASIC.search(text) is None:
        return "basic"
    if _NOT_GSM.search(text) is None:
        return "extended"
    if _ASTRAL.search(text):
        return "astral"
    return "joining" if JOINERS.search(text) else "ucs2"


def _parts(encoding: Encoding, units: int) -> int:
    single, per_part = LIMITS[encoding]
    return 1 if units <= single else -(-units // per_part)


def _texts(column: list[str] | list[str | None], complete: bool) -> list[str]:
    """A column's values, a missing one as empty text."""
    return cast("list[str]", column) if complete else [v or "" for v in column]


def _odd_characters(column: Sequence[str], lengths: Sequence[int],
                    pattern: re.Pattern[str]) -> Iterator[tuple[int, str]]:
    """(row, character) for each character ``pattern`` finds in the values."""
    joined = _SEPARATOR.join(column)
    if (pattern is _NOT_BASIC and joined.isascii()
            and not joined.encode("ascii").translate(None, _ASCII_BASIC)):
        return
    matches = ((m.start(), m.group()) for m in pattern.finditer(joined))
    first = next(matches, None)
    if first is None:
        return
    ends = list(accumulate(map((1).__add__, lengths)))  # where each value's separator sits
    for start, char in chain((first,), matches):
        yield bisect_right(ends, start), char


@dataclass(frozen=True, slots=True)
class Priced:
    """Each recipient's SMS parts; the characters outside GSM-7 in the messages (the body's,
    then the values'); and, by recipient, the parts of each message holding one if they were
    left out (None when that takes pricing every message again)."""

    parts: list[int]
    ucs2: list[str]
    without_ucs2: list[int] | dict[int, int] | None  # every recipient's, or the changed ones


@dataclass(frozen=True, slots=True)
class Columns:
    """A template's variables, each as one value per recipient (None where one lacks it)."""

    values: Mapping[str, list[str] | list[str | None]]
    incomplete: frozenset[str]  # the variables some recipient lacks


class Template:
    """A body template, split once into literal text and variable names."""

    def __init__(self, body: str, footer: bool, *, smart_encoding: bool = False,
                 without: str = "") -> None:
        """Parse ``body``; with ``smart_encoding`` every message is the Smart-Encoded text, and
        characters in ``without`` are left out of every message (to price it without them)."""
        self.body, self.footer, self.smart_encoding = body, footer, smart_encoding
        self._translation: dict[int, str | None] = {
            **(SMART_TRANSLATION if smart_encoding else {}), **dict.fromkeys(map(ord, without))}
        sources = [chr(c) for c in self._translation]
        self._sources = re.compile(f"[{re.escape(''.join(sources))}]") if sources else None
        literals: list[str] = []
        names: list[str] = []
        text, last = "", 0
        for match in _PLACEHOLDER.finditer(body):
            text += body[last:match.start()]
            last = match.end()
            if match.group(1) is None:
                text += match.group(0)[0]  # '{{' or '}}': a literal brace
            else:
                literals.append(text)
                names.append(match.group(1))
                text = ""
        literals.append(text + body[last:] + (STOP_FOOTER if footer else ""))
        self.literals = tuple(self._translate(literal) for literal in literals)
        self.names = tuple(names)
        self.variables = frozenset(names)
        self.static = not names

    def _translate(self, text: str) -> str:
        """A value or literal as it goes in the message."""
        if self._sources is None or self._sources.search(text) is None:
            return text
        return text.translate(self._translation)

    def smart_encoded(self) -> Template:
        """This template with Smart Encoding on."""
        return Template(self.body, self.footer, smart_encoding=True)

    def without(self, characters: str) -> Template:
        """This template, its messages leaving out ``characters``."""
        return Template(self.body, self.footer, smart_encoding=self.smart_encoding,
                        without=characters)

    def render(self, variables: Mapping[str, str]) -> str:
        """The message for one recipient; a missing variable renders as nothing."""
        out = [self.literals[0]]
        translate = self._translate
        for name, literal in zip(self.names, self.literals[1:], strict=True):
            out += (translate(variables.get(name, "")), literal)
        return "".join(out)

    def columns(self, variables: Sequence[Mapping[str, str]]) -> Columns:
        """Each variable's values, recipient by recipient."""
        values: dict[str, list[str] | list[str | None]] = {}
        incomplete: set[str] = set()
        for name in dict.fromkeys(self.names):
            try:
                values[name] = list(map(operator.itemgetter(name), variables))
            except KeyError:
                values[name] = [v.get(name) for v in variables]
                if None in values[name]:
                    incomplete.add(name)
        return self.adopt(Columns(values, frozenset(incomplete)))

    def adopt(self, columns: Columns) -> Columns:
        """Columns read for another template of the same body, as this one's messages hold
        them (its Smart Encoding and left-out characters applied)."""
        values = dict(columns.values)
        incomplete = columns.incomplete
        if self._sources is not None:
            for name, column in values.items():
                texts = _texts(column, name not in incomplete)
                rows = {row for row, _ in _odd_characters(texts, list(map(len, texts)),
                                                          self._sources)}
                if rows:
                    changed = list(column)
                    for row in rows:
                        changed[row] = texts[row].translate(self._translation)
                    values[name] = changed
        return Columns(values, incomplete)

    def ucs2_characters(self, columns: Columns) -> list[str]:
        """The characters outside GSM-7 in the messages: the literal text's, then the values'."""
        found = dict.fromkeys(_NOT_GSM.findall("".join(self.literals)))
        for name, column in columns.values.items():
            joined = _SEPARATOR.join(_texts(column, name not in columns.incomplete))
            if not (joined.isascii()
                    and not joined.encode("ascii").translate(None, _ASCII_GSM)):
                found.update(dict.fromkeys(_NOT_GSM.findall(joined)))
        return list(found)

    def segments(self, variables: Sequence[Mapping[str, str]]) -> list[int]:
        """SMS parts of each recipient's message, as ``count_segments`` counts them."""
        return self.segments_of(self.columns(variables), variables)

    def segments_of(self, columns: Columns, variables: Sequence[Mapping[str, str]]) -> list[int]:
        """``segments``, given the recipients' ``columns`` too."""
        return self.price(columns, variables).parts

    def price(self, columns: Columns, variables: Sequence[Mapping[str, str]]) -> Priced:
        """Each recipient's SMS parts, and what the characters that force UCS-2 cost."""
        fixed = "".join(self.literals)
        if self.static:
            parts = [count_segments(fixed).segments] * len(variables)
            return Priced(parts, self.ucs2_characters(columns), None)
        kind = _literal_class(fixed)
        if kind in ("extended", "astral"):
            parts = [count_segments(self.render(v)).segments for v in variables]
            return Priced(parts, self.ucs2_characters(columns), None)
        encoding: Encoding = "GSM-7" if kind == "basic" else "UCS-2"
        # In UCS-2 only characters outside the BMP or that may form a cluster change a count.
        pattern = _NOT_BASIC if kind == "basic" else MAY_JOIN
        units = [len(fixed)] * len(variables)
        odd: defaultdict[int, str] = defaultdict(str)
        for name in dict.fromkeys(self.names):
            column = _texts(columns.values[name], name not in columns.incomplete)
            lengths = list(map(len, column))
            times = self.names.count(name)
            for _ in range(times):
                units = list(map(operator.add, units, lengths))
            for row, char in _odd_characters(column, lengths, pattern):
                odd[row] += char * times
        table = [_parts(encoding, n) for n in range(max(units, default=0) + 1)]
        parts = list(map(table.__getitem__, units))
        single = LIMITS["UCS-2"][0]
        if kind == "joining":
            # Any message may hold a cluster: those longer than one part are counted one by one.
            for row in compress(range(len(units)), map(single.__lt__, units)):
                odd[row] += ""
        for row, chars in odd.items():
            ucs2 = kind != "basic" or not _EXTENDED.issuperset(chars)
            if ucs2 and not _ASTRAL.search(chars) and (
                    units[row] <= single or (kind != "joining" and not JOINERS.search(chars))):
                # UCS-2 with one unit a character: in one part, or with no cluster to keep whole.
                parts[row] = _parts("UCS-2", units[row])
            else:
                parts[row] = count_segments(self.render(variables[row])).segments
        if kind != "basic":
            return self._priced_ucs2(fixed, parts, units, columns, variables)
        return self._priced_gsm(parts, units, odd, variables)

    def _priced_ucs2(self, fixed: str, parts: list[int], units: list[int], columns: Columns,
                     variables: Sequence[Mapping[str, str]]) -> Priced:
        """A UCS-2 template's pricing: without its characters outside GSM-7 every message is
        GSM-7, of its length less those plus its escapes (one scan of each variable's values,
        nothing for ASCII ones)."""
        found = dict.fromkeys(_NOT_GSM.findall(fixed))
        stripped = _NOT_GSM.sub("", fixed)
        if not _EXTENDED.isdisjoint(stripped):
            return Priced(parts, self.ucs2_characters(columns), None)
        delta = len(fixed) - len(stripped)
        septets = [n - delta for n in units]  # units: code points here
        odd: defaultdict[int, str] = defaultdict(str)
        for name in dict.fromkeys(self.names):
            column = _texts(columns.values[name], name not in columns.incomplete)
            times = self.names.count(name)
            for row, char in _odd_characters(column, list(map(len, column)), _NOT_BASIC):
                odd[row] += char * times
        escaped: list[int] = []
        for row, chars in odd.items():
            outside = [c for c in chars if c not in _EXTENDED]
            found.update(dict.fromkeys(outside))
            septets[row] += len(chars) - 2 * len(outside)  # + escapes - characters left out
            if len(outside) != len(chars):
                escaped.append(row)
        table = [_parts("GSM-7", n) for n in range(max(septets, default=0) + 1)]
        without = list(map(table.__getitem__, septets))
        if escaped:
            plain = self.without("".join(found))
            for row in escaped:
                without[row] = count_segments(plain.render(variables[row])).segments
        return Priced(parts, list(found), without)

    def _priced_gsm(self, parts: list[int], units: list[int], odd: Mapping[int, str],
                    variables: Sequence[Mapping[str, str]]) -> Priced:
        """A GSM-7 template's pricing: only the values' odd characters can force UCS-2, and a
        message without them is GSM-7 of its other characters."""
        found: dict[str, None] = {}
        without: dict[int, int] = {}
        escaped: list[int] = []
        for row, chars in odd.items():
            if _EXTENDED.issuperset(chars):
                continue
            outside = [c for c in chars if c not in _EXTENDED]
            found.update(dict.fromkeys(outside))
            if len(outside) == len(chars):
                without[row] = _parts("GSM-7", units[row] - len(outside))
            else:
                escaped.append(row)
        if escaped:
            plain = self.without("".join(found))
            for row in escaped:
                without[row] = count_segments(plain.render(variables[row])).segments
        return Priced(parts, list(found), without)
