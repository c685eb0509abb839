"""SMS parts counted as Twilio's calculator counts them: a part never splits a grapheme cluster.

The reference is TwilioDevEd/message-segment-calculator (``SegmentedMessage._buildSegments``,
``Segment.addHeader``), re-implemented here literally, bit by bit, over the ``regex`` package's
``\\X`` clusters, independently of ``dispatcher.pricing.quotes``.
"""

from __future__ import annotations

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.pricing.quotes import (
    GSM7_BASIC,
    GSM7_EXTENDED,
    JOINERS,
    MAY_JOIN,
    count_segments,
    split_parts,
)
from dispatcher.pricing.templates import Template

FLAG = "\U0001f1ec\U0001f1e7"  # GB: two regional indicators, 4 UTF-16 units
THUMB_TONE = "\U0001f44d\U0001f3fd"  # thumbs up + medium skin tone, 4 units
RAINBOW = "\U0001f3f3\ufe0f\u200d\U0001f308"  # white flag, VS16, ZWJ, rainbow: 6 units
FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # man ZWJ woman ZWJ girl: 8 units
KEYCAP = "1\ufe0f\u20e3"  # 3 units
ACCENTED = "e\u0301"  # e + combining acute: 2 units
DEVANAGARI = "\u0915\u093f"  # ka + vowel sign i (a spacing mark): 2 units
JAMO = "\u1100\u1161"  # Hangul choseong kiyeok + jungseong a: 2 units


def utf16(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def calculator_segments(body: str) -> int:
    """The calculator's segment count, transcribed from its TypeScript."""
    graphemes: list[str] = []
    for g in regex.findall(r"\X", body):
        graphemes += ["\r", "\n"] if g == "\r\n" else [g]
    gsm = set(GSM7_BASIC + GSM7_EXTENDED)
    ucs2 = any(len(g) >= 2 or g not in gsm for g in graphemes)

    def bits(g: str) -> int:
        if ucs2:
            return 16 * utf16(g)
        return 14 if g in GSM7_EXTENDED else 7

    header = [8] * 6
    segments: list[list[int]] = [[]]
    for g in graphemes:
        current = segments[-1]
        if 1120 - sum(current) < bits(g):
            segments.append(list(header))
            if len(segments) == 2:  # the previous one is the first: it gets its header now
                previous = segments[0]
                previous[:0] = header
                removed: list[int] = []
                while 1120 - sum(previous) < 0:
                    removed.insert(0, previous.pop())
                segments[1] += removed
        segments[-1].append(bits(g))
    return len(segments)


@pytest.mark.parametrize(("body", "segments"), [
    # GSM-7: 160 in one part, 153 a part after that; an escape pair moves whole.
    ("a" * 160, 1), ("a" * 161, 2), ("a" * 306, 2), ("a" * 307, 3),
    ("a" * 158 + "€", 1), ("a" * 159 + "€", 2), ("€" + "1" * 158, 1), ("€" + "1" * 159, 2),
    ("a" * 152 + "€" + "a" * 152, 3), ("a" * 151 + "€" + "a" * 153, 2),
    # UCS-2: 70 in one part, 67 a part after that.
    ("ж" * 70, 1), ("ж" * 71, 2), ("ж" * 134, 2), ("ж" * 135, 3),
    ("😜" + "2" * 68, 1), ("😜" + "2" * 69, 2),
    # A cluster fits in one part when the whole message does (the calculator's own cases).
    ("🇮🇹" + "2" * 66, 1), ("🇮🇹" + "2" * 67, 2),
    (RAINBOW + "2" * 64, 1), (RAINBOW + "2" * 65, 2),
    ("e\u0301\u0301\u0301" + "a" * 66, 1), ("e\u0301\u0301\u0301" + "a" * 67, 2),
    ("😀" + "]" * 68, 1), ("😀" + "]" * 69, 2),
    # A cluster across the 67-unit boundary moves whole to the next part: one more part than
    # splitting it would give (134 units each).
    ("x" * 65 + FLAG + "y" * 65, 3),
    ("x" * 65 + THUMB_TONE + "y" * 65, 3),
    ("x" * 64 + RAINBOW + "y" * 64, 3),
    ("x" * 64 + FAMILY + "y" * 62, 3),
    ("x" * 65 + KEYCAP + "y" * 66, 3),
    ("ж" * 66 + ACCENTED + "ж" * 66, 3),
    ("ж" * 66 + DEVANAGARI + "ж" * 66, 3),
    ("ж" * 66 + JAMO + "ж" * 66, 3),
    # The same clusters clear of the boundary: two parts.
    ("x" * 60 + FLAG + "y" * 70, 2), ("x" * 58 + FAMILY + "y" * 68, 2),
    ("ж" * 60 + ACCENTED + "ж" * 72, 2),
])
def test_parts_at_every_boundary(body: str, segments: int) -> None:
    assert count_segments(body).segments == segments == calculator_segments(body)
    parts = split_parts(body)
    assert "".join(parts) == body and len(parts) == segments
    # No part ends inside a cluster.
    assert [g for part in parts for g in regex.findall(r"\X", part)] == regex.findall(
        r"\X", body)


def test_clusters_move_whole_to_the_next_part() -> None:
    assert split_parts("x" * 64 + RAINBOW + "y" * 64) == [
        "x" * 64, RAINBOW + "y" * 61, "y" * 3]
    assert split_parts("ж" * 66 + ACCENTED + "ж" * 66) == ["ж" * 66, ACCENTED + "ж" * 65, "ж"]


def test_a_cluster_longer_than_a_part_fills_one_by_itself() -> None:
    """As the calculator does: it never splits one, even one that cannot fit in a part."""
    giant = "\U0001f468" + "\u200d\U0001f469" * 25  # one ZWJ sequence of 77 units
    assert utf16(giant) == 77 and len(regex.findall(r"\X", giant)) == 1
    for body, segments in ((giant, 2), ("x" + giant, 2), (giant + "y", 3),
                           ("x" * 70 + giant, 2), ("x" * 70 + giant + "y", 3)):
        assert count_segments(body).segments == segments == calculator_segments(body)


CLUSTERY = st.sampled_from([
    "a", "1", "€", "\r", "\n", "ж", "é", "\u0301", "\u200d", "\ufe0f", "\u20e3",
    "\U0001f1ec", "\U0001f1e7", "\U0001f44d", "\U0001f3fd", "\U0001f469", "\u0915", "\u093f",
    "\u1100", "\u1161", "\u11a8", "😀"])


@settings(max_examples=500, deadline=None)
@given(st.lists(CLUSTERY, max_size=300).map("".join))
def test_count_matches_the_calculator(body: str) -> None:
    assert count_segments(body).segments == calculator_segments(body)
    parts = split_parts(body)
    assert "".join(parts) == body and len(parts) == count_segments(body).segments


@settings(max_examples=300, deadline=None)
@given(before=st.lists(CLUSTERY, max_size=90).map("".join),
       rows=st.lists(st.lists(CLUSTERY, max_size=120).map("".join), max_size=8))
def test_templates_count_clusters_like_the_calculator(before: str, rows: list[str]) -> None:
    for literal in (before, "plain text " * 6, "ж" * 60):
        template = Template(literal + "{a}!", footer=False)
        variables = [{"a": value} for value in rows]
        assert template.segments(variables) == [
            calculator_segments(template.render(v)) for v in variables]


def test_the_cluster_free_blocks_hold_no_character_that_joins_another() -> None:
    bmp = "".join(map(chr, range(0xD800)))
    assert not JOINERS.findall(MAY_JOIN.sub("", bmp))
    assert MAY_JOIN.search("\U0001f600") and MAY_JOIN.search("\u200d")
