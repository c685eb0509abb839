"""SMS segments and credit cost: what a send is estimated to cost, from the operators' rates."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, get_args

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


def _septets(char: str) -> int:
    """Septets of a GSM-7 character: the extension table's need an escape first."""
    return 2 if char in _EXTENDED else 1


def _utf16_units(char: str) -> int:
    """UTF-16 units of a character: two (a surrogate pair) outside the BMP."""
    return 2 if char > "\uffff" else 1


def _pack(body: str, size: Callable[[str], int], capacity: int) -> list[str]:
    """Greedy parts of at most ``capacity`` units, never splitting a character's units."""
    parts: list[str] = []
    start = fill = 0
    for index, char in enumerate(body):
        units = size(char)
        if fill + units > capacity:
            parts.append(body[start:index])
            start, fill = index, 0
        fill += units
    parts.append(body[start:])
    return parts


def _count(encoding: Encoding, units: int, wide: bool, body: str) -> SegmentCount:
    """Segments for a body of ``units``; ``wide`` if some character takes two units."""
    single, per_part = LIMITS[encoding]
    if wide and units > single:
        size = _septets if encoding == "GSM-7" else _utf16_units
        return SegmentCount(encoding, units, len(_pack(body, size, per_part)))
    plain = _PLAIN[encoding]
    if units < len(plain):
        return plain[units]
    return SegmentCount(encoding, units, -(-units // per_part))


def _count_ascii(body: str) -> SegmentCount:
    """An ASCII body: GSM-7 unless it has a backtick or a control other than CR, LF, FF."""
    odd = body.encode("ascii").translate(None, _ASCII_BASIC)
    if not odd:
        return _count("GSM-7", len(body), False, body)
    if odd.translate(None, _ASCII_EXTENDED):
        return _count("UCS-2", len(body), False, body)
    return _count("GSM-7", len(body) + len(odd), True, body)


def count_segments(body: str) -> SegmentCount:
    """Encoding, units and SMS parts of a body, as handsets and Twilio split it."""
    if body.isascii():
        return _count_ascii(body)
    odd = _NOT_BASIC.findall(body)
    if _EXTENDED.issuperset(odd):
        return _count("GSM-7", len(body) + len(odd), bool(odd), body)
    units = len(body.encode("utf-16-le", "surrogatepass")) // 2
    return _count("UCS-2", units, units > len(body), body)


def split_parts(body: str) -> list[str]:
    """The text of each part the body is sent as (one part, maybe empty, if it fits in one)."""
    count = count_segments(body)
    if count.segments == 1:
        return [body]
    size = _septets if count.encoding == "GSM-7" else _utf16_units
    return _pack(body, size, LIMITS[count.encoding][1])


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
