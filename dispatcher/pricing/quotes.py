"""SMS segments and credit cost: what a send is estimated to cost, from the operators' rates."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, get_args

import regex

from dispatcher.errors import DispatcherError, InvalidAmount, UnknownChannel
from dispatcher.pricing.numbers import country_of

Encoding = Literal["GSM-7", "UCS-2"]
Channel = Literal["sms", "call"]
CHANNELS: tuple[Channel, ...] = get_args(Channel)
DEFAULT_COUNTRY = "*"

# GSM 03.38 default alphabet (one septet each) and its extension table (escape + char: two).
GSM7_BASIC = ("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
              "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
GSM7_EXTENDED = "\f^{}\\[~]|€"
# (single-part capacity, capacity of each part of a multipart message), in septets / UTF-16 units.
LIMITS: dict[Encoding, tuple[int, int]] = {"GSM-7": (160, 153), "UCS-2": (70, 67)}

_ASCII_BASIC = bytes(c for c in range(128) if chr(c) in GSM7_BASIC)
_ASCII_EXTENDED = GSM7_EXTENDED.replace("€", "").encode("ascii")
_NOT_BASIC = re.compile(f"[^{re.escape(GSM7_BASIC)}]")
_EXTENDED = frozenset(GSM7_EXTENDED)

# Twilio bills the parts of its own calculator (TwilioDevEd/message-segment-calculator,
# src/libs/SegmentedMessage.ts and Segment.ts): a part is 140 octets; a message of several
# parts reserves a 6-octet header in each; a part boundary never splits a user-perceived
# character (an extended grapheme cluster, except CR LF, which it counts as two).
SEGMENT_BITS, HEADER_BITS = 1120, 48
_GRAPHEME = regex.compile(r"\X")
# Blocks with no character that can join its neighbour (checked by tests/unit/test_segments.py):
# a plain ``re`` class of them finds the few messages worth a look with JOINERS, ~10x faster
# than the property class.
CLUSTER_FREE = ("\n\r\u0020-\u02ff\u0370-\u0482\u048a-\u0590\u05d0-\u05ea\u0620-\u064a"
                "\u1e00-\u1fff\u2010-\u2027\u2030-\u205f\u2070-\u20cf\u2100-\u2bff"
                "\u3000-\u3029\u3031-\u3098\u309b-\u9fff\uac00-\ud7a3\uff01-\uff9d")
MAY_JOIN = re.compile(f"[^{CLUSTER_FREE}]")  # also finds every character outside the BMP
# A character that can join its neighbour into one cluster (UAX #29 rules GB6-GB9c and
# GB11-GB13): without one, every code point is a cluster of its own.
JOINERS = regex.compile(
    "[" + "".join(f"\\p{{Grapheme_Cluster_Break={kind}}}" for kind in (
        "Extend", "ZWJ", "SpacingMark", "Prepend", "Regional_Indicator", "L", "V", "T")) + "]")


@dataclass(frozen=True, slots=True)
class SegmentCount:
    """How a body travels: its encoding, its length in septets or UTF-16 units, its parts."""

    encoding: Encoding
    units: int
    segments: int


def _plain_counts(encoding: Encoding, parts: int) -> list[SegmentCount]:
    """Counts for every length up to ``parts`` full parts, no character taking two units."""
    single, per_part = LIMITS[encoding]
    return [SegmentCount(encoding, units, 1 if units <= single else -(-units // per_part))
            for units in range(per_part * parts + 1)]


# Built once: a frozen dataclass costs more to build than counting a short body does.
_PLAIN = {encoding: _plain_counts(encoding, 10) for encoding in LIMITS}


def _characters(body: str, encoding: Encoding) -> tuple[list[str], list[int]]:
    """The characters the calculator packs (code points in GSM-7, clusters in UCS-2), in bits."""
    if encoding == "GSM-7":
        return list(body), [14 if char in _EXTENDED else 7 for char in body]
    clusters: list[str] = []
    for cluster in _GRAPHEME.findall(body):
        clusters += ("\r", "\n") if cluster == "\r\n" else (cluster,)
    return clusters, [16 * (len(c.encode("utf-16-le", "surrogatepass")) // 2) for c in clusters]


def part_sizes(bits: Sequence[int]) -> list[int]:
    """How many characters each part holds, split the way Twilio's calculator splits them.

    Characters fill the first part while they fit; when one does not, the first part gets its
    header and hands its last characters on until it fits again, and every later part starts
    with its header. A character is never split; one larger than a part fills one by itself
    (and leaves the part before it as it was: the calculator's, so Twilio's, count).
    """
    sizes = [0]
    first: list[int] = []  # the first part's characters, until it has its header
    used = 0
    for size in bits:
        if SEGMENT_BITS - used < size:
            used = HEADER_BITS
            sizes.append(0)
            if len(sizes) == 2:
                kept = sum(first) + HEADER_BITS
                while kept > SEGMENT_BITS:
                    moved = first.pop()
                    kept -= moved
                    used += moved
                    sizes[0] -= 1
                    sizes[1] += 1
        if len(sizes) == 1:
            first.append(size)
        sizes[-1] += 1
        used += size
    return sizes


def _count(encoding: Encoding, units: int, body: str) -> SegmentCount:
    """Segments of a body of ``units``, packing its characters one by one past one part."""
    if units <= LIMITS[encoding][0]:
        return _PLAIN[encoding][units]
    return SegmentCount(encoding, units, len(part_sizes(_characters(body, encoding)[1])))


def _count_plain(encoding: Encoding, units: int) -> SegmentCount:
    """Segments of a body of ``units`` in which every character takes one unit."""
    plain = _PLAIN[encoding]
    if units < len(plain):
        return plain[units]
    return SegmentCount(encoding, units, -(-units // LIMITS[encoding][1]))


def _count_ascii(body: str) -> SegmentCount:
    """An ASCII body: GSM-7 unless it has a backtick or a control other than CR, LF, FF."""
    odd = body.encode("ascii").translate(None, _ASCII_BASIC)
    if not odd:
        return _count_plain("GSM-7", len(body))
    if odd.translate(None, _ASCII_EXTENDED):
        return _count_plain("UCS-2", len(body))
    return _count("GSM-7", len(body) + len(odd), body)


def count_segments(body: str) -> SegmentCount:
    """Encoding, units and SMS parts of a body, as handsets and Twilio split it."""
    if body.isascii():
        return _count_ascii(body)
    odd = _NOT_BASIC.findall(body)
    if _EXTENDED.issuperset(odd):
        if not odd:
            return _count_plain("GSM-7", len(body))
        return _count("GSM-7", len(body) + len(odd), body)
    units = len(body.encode("utf-16-le", "surrogatepass")) // 2
    if units == len(body) and (MAY_JOIN.search(body) is None or JOINERS.search(body) is None):
        return _count_plain("UCS-2", units)
    return _count("UCS-2", units, body)


def split_parts(body: str) -> list[str]:
    """The text of each part the body is sent as (one part, maybe empty, if it fits in one)."""
    count = count_segments(body)
    if count.segments == 1:
        return [body]
    characters, bits = _characters(body, count.encoding)
    parts, start = [], 0
    for size in part_sizes(bits):
        parts.append("".join(characters[start:start + size]))
        start += size
    return parts


class NoRate(DispatcherError):
    """No rate is set for this channel and country, and no default ('*') for the channel."""

    code = "no_rate"


class InvalidRate(DispatcherError):
    """A rate needs an alpha-2 country (or '*') and a whole number of credits, zero or more."""

    code = "invalid_rate"


def _channel(channel: str) -> Channel:
    """The channel, if it is one we price."""
    for known in CHANNELS:
        if channel == known:
            return known
    raise UnknownChannel(channel=channel)


def _rate_row(row: tuple[str, str, int]) -> tuple[Channel, str, int]:
    """A checked rate row."""
    channel, country, credits = row
    if not (country == DEFAULT_COUNTRY or (len(country) == 2 and country.isascii()
                                           and country.isalpha() and country.isupper())):
        raise InvalidRate(f"country must be alpha-2 or '*', not {country!r}")
    if isinstance(credits, bool) or not isinstance(credits, int) or credits < 0:
        raise InvalidRate(f"credits must be a whole number ≥ 0, not {credits!r}")
    return _channel(channel), country, credits


def _index(rows: tuple[tuple[Channel, str, int], ...]) -> Mapping[tuple[str, str], int]:
    """Rates by (channel, country), refusing two rates for one pair."""
    index: dict[tuple[str, str], int] = {}
    for channel, country, credits in rows:
        if (channel, country) in index:
            raise InvalidRate(f"two rates for {channel} {country}")
        index[channel, country] = credits
    return MappingProxyType(index)


@dataclass(frozen=True, slots=True, init=False)
class RateTable:
    """Credits per SMS segment or call minute, by channel and country; '*' is the default."""

    rows: tuple[tuple[Channel, str, int], ...]
    _rates: Mapping[tuple[str, str], int] = field(compare=False, repr=False)

    def __init__(self, rows: Iterable[tuple[str, str, int]]) -> None:
        checked = tuple(sorted(map(_rate_row, rows)))
        object.__setattr__(self, "rows", checked)
        object.__setattr__(self, "_rates", _index(checked))

    def rate(self, channel: str, country: str) -> int:
        """The country's rate for the channel, else the channel's '*' rate."""
        rates = self._rates
        found = rates.get((_channel(channel), country))
        if found is None:
            found = rates.get((channel, DEFAULT_COUNTRY))
        if found is None:
            raise NoRate(channel=channel, country=country)
        return found


@dataclass(frozen=True, slots=True)
class Quote:
    """What one send is estimated to cost (SMS: segments * rate; call: minutes * rate)."""

    channel: Channel
    country: str
    segments: int  # SMS parts; 0 for a call
    minutes: int  # call minutes; 0 for an SMS
    rate: int  # credits per segment or minute
    credits: int
    encoding: Encoding | None = None  # SMS only


def sms_quote(recipient: str, body: str, rates: RateTable) -> Quote:
    """The cost of sending ``body`` to ``recipient``."""
    country = country_of(recipient)
    count = count_segments(body)
    rate = rates.rate("sms", country)
    return Quote("sms", country, count.segments, 0, rate, count.segments * rate, count.encoding)


def call_quote(recipient: str, minutes: int, rates: RateTable) -> Quote:
    """The cost of a call of at most ``minutes`` (a positive whole number) to ``recipient``."""
    if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes <= 0:
        raise InvalidAmount("call minutes must be a positive whole number", minutes=minutes)
    country = country_of(recipient)
    rate = rates.rate("call", country)
    return Quote("call", country, 0, minutes, rate, minutes * rate)


def quote(channel: str, recipient: str, body_or_minutes: str | int, rates: RateTable) -> Quote:
    """``sms_quote`` or ``call_quote`` by channel name ('sms' or 'call')."""
    if _channel(channel) == "sms":
        if not isinstance(body_or_minutes, str):
            raise TypeError("an SMS quote needs the message body")
        return sms_quote(recipient, body_or_minutes, rates)
    if isinstance(body_or_minutes, str):
        raise InvalidAmount("call minutes must be a positive whole number")
    return call_quote(recipient, body_or_minutes, rates)
