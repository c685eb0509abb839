"""SMS segments (greedy packing, as handsets and Twilio split), rates and quotes."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.errors import InvalidAmount, InvalidRecipient, UnknownChannel
from dispatcher.pricing.quotes import (
    GSM7_BASIC,
    GSM7_EXTENDED,
    InvalidRate,
    NoRate,
    Quote,
    RateTable,
    SegmentCount,
    call_quote,
    count_segments,
    quote,
    sms_quote,
    split_parts,
)

US, CA, JM = "+12015550123", "+16045550123", "+18765230123"
EMOJI = "😀"  # outside the BMP: a surrogate pair, two UTF-16 units


@pytest.mark.parametrize(("body", "encoding", "units", "segments"), [
    ("", "GSM-7", 0, 1),
    ("a" * 160, "GSM-7", 160, 1),
    ("a" * 161, "GSM-7", 161, 2),
    ("a" * 306, "GSM-7", 306, 2),
    ("a" * 307, "GSM-7", 307, 3),
    ("€" * 80, "GSM-7", 160, 1),
    ("€" * 81, "GSM-7", 162, 2),
    ("a" * 158 + "€", "GSM-7", 160, 1),
    ("a" * 159 + "€", "GSM-7", 161, 2),
    # 306 septets would fit in two parts, but the escape pair at septet 153 moves to part two.
    ("a" * 152 + "€" + "a" * 152, "GSM-7", 306, 3),
    ("a" * 151 + "€" + "a" * 153, "GSM-7", 306, 2),
    ("a" * 152 + "{" + "a" * 152, "GSM-7", 306, 3),
    ("ж" * 70, "UCS-2", 70, 1),
    ("ж" * 71, "UCS-2", 71, 2),
    ("ж" * 134, "UCS-2", 134, 2),
    ("ж" * 135, "UCS-2", 135, 3),
    ("a" * 69 + "ж", "UCS-2", 70, 1),
    (EMOJI * 35, "UCS-2", 70, 1),
    (EMOJI * 36, "UCS-2", 72, 2),
    # 134 units would fit in two parts, but the surrogate pair at unit 67 moves to part two.
    ("ж" * 66 + EMOJI + "ж" * 66, "UCS-2", 134, 3),
    ("ж" * 65 + EMOJI + "ж" * 67, "UCS-2", 134, 2),
    ("Hello\r\nworld @ 5£ ¥ §", "GSM-7", 21, 1),
    ("café ÄÖÑÜ äöñüà Ç ΔΦΓΛΩΠΨΣΘΞ", "GSM-7", 28, 1),
    ("^{}\\[~]|\f€", "GSM-7", 20, 1),
    ("é€", "GSM-7", 3, 1),
    ("back`tick", "UCS-2", 9, 1),
    ("tab\there", "UCS-2", 8, 1),
    ("ç", "UCS-2", 1, 1),
    ("coffee ☕", "UCS-2", 8, 1),
])
def test_count_segments(body: str, encoding: str, units: int, segments: int) -> None:
    assert count_segments(body) == SegmentCount(encoding, units, segments)  # type: ignore[arg-type]
    parts = split_parts(body)
    assert "".join(parts) == body and len(parts) == segments


def test_split_parts_never_splits_an_escape_pair_or_a_surrogate_pair() -> None:
    gsm = split_parts("a" * 152 + "€" + "a" * 152)
    assert gsm == ["a" * 152, "€" + "a" * 151, "a"]  # septets: 152, 153, 1
    ucs2 = split_parts("ж" * 66 + EMOJI + "ж" * 66)
    assert ucs2 == ["ж" * 66, EMOJI + "ж" * 65, "ж"]  # UTF-16 units: 66, 67, 1


def gsm_or_utf16_units(text: str, gsm: bool) -> int:
    """Units of a text, computed independently of the module: septets or UTF-16 code units."""
    if gsm:
        return len(text) + sum(c in GSM7_EXTENDED for c in text)
    return len(text.encode("utf-16-le")) // 2


ALPHABET = st.sampled_from(list(GSM7_BASIC[:20] + GSM7_EXTENDED + "ab ж☕" + EMOJI))


@settings(max_examples=300, deadline=None)
@given(st.text(ALPHABET, max_size=400))
def test_greedy_packing_properties(body: str) -> None:
    count = count_segments(body)
    gsm = all(c in GSM7_BASIC + GSM7_EXTENDED for c in body)
    assert count.encoding == ("GSM-7" if gsm else "UCS-2")
    assert count.units == gsm_or_utf16_units(body, gsm)
    single, per_part = (160, 153) if gsm else (70, 67)
    parts = split_parts(body)
    assert "".join(parts) == body and len(parts) == count.segments
    if count.units <= single:
        assert count.segments == 1
        return
    assert count.segments >= math.ceil(count.units / per_part)
    sizes = [gsm_or_utf16_units(part, gsm) for part in parts]
    assert all(0 < size <= per_part for size in sizes)
    # Greedy: each part is full, up to a character that would not fit whole.
    for part, size, following in zip(parts, sizes, parts[1:], strict=False):
        assert size + gsm_or_utf16_units(following[0], gsm) > per_part, part


RATES = RateTable([("sms", "US", 2), ("sms", "JM", 7), ("sms", "*", 1),
                   ("call", "US", 3), ("call", "CA", 4)])


def test_rate_table_country_rate_and_default() -> None:
    assert RATES.rate("sms", "US") == 2
    assert RATES.rate("sms", "JM") == 7
    assert RATES.rate("sms", "CA") == 1  # '*'
    assert RATES.rate("call", "CA") == 4


def test_rate_table_without_default_refuses_unlisted_countries() -> None:
    with pytest.raises(NoRate):
        RATES.rate("call", "JM")


@pytest.mark.parametrize("channel", ["fax", "SMS", ""])
def test_rate_table_unknown_channel(channel: str) -> None:
    with pytest.raises(UnknownChannel):
        RATES.rate(channel, "US")
    with pytest.raises(UnknownChannel):
        RateTable([(channel, "US", 1)])


@pytest.mark.parametrize("row", [
    ("sms", "usa", 1), ("sms", "us", 1), ("sms", "", 1), ("sms", "US", -1), ("sms", "US", True),
    ("sms", "US", 1.5),
])
def test_rate_table_refuses_bad_rows(row: tuple[str, str, int]) -> None:
    with pytest.raises(InvalidRate):
        RateTable([row])


def test_rate_table_is_an_immutable_value() -> None:
    with pytest.raises(InvalidRate, match="two rates"):
        RateTable([("sms", "US", 1), ("sms", "US", 2)])
    same = RateTable(reversed(RATES.rows))
    assert same == RATES and hash(same) == hash(RATES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        RATES.rows = ()  # type: ignore[misc]


@pytest.mark.parametrize(("recipient", "body", "expected"), [
    (US, "a" * 160, Quote("sms", "US", 1, 0, 2, 2, "GSM-7")),
    (US, "a" * 161, Quote("sms", "US", 2, 0, 2, 4, "GSM-7")),
    (CA, "ж" * 71, Quote("sms", "CA", 2, 0, 1, 2, "UCS-2")),
    (JM, "a" * 152 + "€" + "a" * 152, Quote("sms", "JM", 3, 0, 7, 21, "GSM-7")),
    (JM, "", Quote("sms", "JM", 1, 0, 7, 7, "GSM-7")),
])
def test_sms_quote(recipient: str, body: str, expected: Quote) -> None:
    assert sms_quote(recipient, body, RATES) == expected
    assert quote("sms", recipient, body, RATES) == expected


def test_call_quote() -> None:
    assert call_quote(US, 5, RATES) == Quote("call", "US", 0, 5, 3, 15)
    assert quote("call", CA, 2, RATES) == Quote("call", "CA", 0, 2, 4, 8)
    with pytest.raises(NoRate):
        call_quote(JM, 1, RATES)


@pytest.mark.parametrize("minutes", [0, -1, True, 1.5, "3"])
def test_call_minutes_must_be_a_positive_whole_number(minutes: int) -> None:
    with pytest.raises(InvalidAmount):
        quote("call", US, minutes, RATES)


def test_quote_refuses_unknown_channels_and_invalid_recipients() -> None:
    with pytest.raises(UnknownChannel):
        quote("fax", US, "hi", RATES)
    with pytest.raises(InvalidRecipient):
        sms_quote("+11235550123", "hi", RATES)
    with pytest.raises(InvalidRecipient):
        call_quote("4155552671", 1, RATES)
    with pytest.raises(TypeError):
        quote("sms", US, 3, RATES)
