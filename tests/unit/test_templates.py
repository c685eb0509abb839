"""Template.segments counts every recipient's parts exactly as count_segments(render(...))."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.pricing.quotes import GSM7_BASIC, GSM7_EXTENDED, count_segments
from dispatcher.pricing.templates import Template

EMOJI = "😀"
ALPHABET = st.sampled_from(list(GSM7_BASIC[:40] + GSM7_EXTENDED + "aZ9 Łé李ж`" + EMOJI))
VALUES = st.text(ALPHABET, max_size=200)
LITERALS = st.text(ALPHABET, max_size=120).map(
    lambda t: t.replace("{", "{{").replace("}", "}}"))


def test_render_fills_variables_and_literal_braces() -> None:
    template = Template("Hi {name}, {{code}} is {code}{name}", footer=True)
    assert template.render({"name": "Ana", "code": "42"}) == (
        "Hi Ana, {code} is 42Ana\nReply STOP to unsubscribe")
    assert template.render({}) == "Hi , {code} is \nReply STOP to unsubscribe"
    assert template.variables == {"name", "code"}


def test_static_template_counts_once_for_everyone() -> None:
    assert Template("a" * 161, footer=False).segments([{}, {"x": "y"}]) == [2, 2]


@settings(max_examples=300, deadline=None)
@given(before=LITERALS, middle=LITERALS, footer=st.booleans(),
       rows=st.lists(st.fixed_dictionaries({"a": VALUES, "b": VALUES}), max_size=12))
def test_segments_match_counting_each_rendered_message(
        before: str, middle: str, footer: bool, rows: list[dict[str, str]]) -> None:
    template = Template(f"{before}{{a}}{middle}{{b}}{{a}}", footer)
    expected = [count_segments(template.render(row)).segments for row in rows]
    assert template.segments(rows) == expected


def test_one_ucs2_value_makes_only_its_message_ucs2() -> None:
    rows = [{"name": "a" * 100}, {"name": "李" + "a" * 99}, {"name": "é" * 100}]
    template = Template("Hello {name}, see you soon at the shop", footer=False)
    # GSM-7: 132 septets fit one part; UCS-2: 132 units need two parts of 67.
    assert template.segments(rows) == [1, 2, 1]


def test_a_value_outside_gsm7_counts_its_message_as_ucs2_of_the_same_length() -> None:
    template = Template("Dear {name}, {code}", footer=False)
    rows = [{"name": "Zoë", "code": "x" * 60},  # 70 units: one UCS-2 part
            {"name": "Zoë", "code": "x" * 61},  # 71: two parts
            {"name": "Zoë€", "code": "x" * 200},  # € takes one UCS-2 unit once ë forces UCS-2
            {"name": "€", "code": "x" * 152},  # GSM-7 with an escape: 161 septets, two parts
            {"name": "😀ë", "code": "x" * 60},  # a surrogate pair: counted on its own
            {"code": "ж"}]  # missing variable, odd character in the other
    assert template.segments(rows) == [count_segments(template.render(r)).segments for r in rows]
    assert template.segments(rows)[:4] == [1, 2, 4, 2]
