"""Smart Encoding: Twilio's look-alike table, and templates priced as the encoded text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.pricing.quotes import GSM7_BASIC, GSM7_EXTENDED, count_segments
from dispatcher.pricing.smart_encoding import TABLE, smart_encode
from dispatcher.pricing.templates import Template

GSM7 = set(GSM7_BASIC + GSM7_EXTENDED)


@pytest.mark.parametrize(("text", "sent"), [
    ("\u201cquoted\u201d \u2018single\u2019 \u00abangled\u00bb", "\"quoted\" 'single' \"angled\""),
    ("en\u2013dash em\u2014dash \u2022 bullet", "en-dash em-dash - bullet"),
    ("no\u00a0break\u2009thin\u3000ideographic\ttab", "no break thin ideographic tab"),
    ("wait\u2026", "wait..."),
    ("\u00bd \u00bc \u00be \u00f7", "1/2 1/4 3/4 /"),
    ("\uff28\uff29 \u1d00\u0299\u1d04 \uff11\uff12 \uff49", "HI ABC 12 \uff49"),
    ("zero\u200bwidth\ufeff\u2060", "zerowidth"),
    ("back`tick", "back'tick"),
    ("\u2039a\u203a \u203c", "<a> !!"),
    ("left alone: \u00e9\u00e8 \u20ac [x]", "left alone: \u00e9\u00e8 \u20ac [x]"),
    ("emoji stays \U0001f600 \u0436", "emoji stays \U0001f600 \u0436"),
])
def test_look_alikes_become_gsm7(text: str, sent: str) -> None:
    assert smart_encode(text) == sent


def test_every_replacement_is_gsm7_and_every_source_is_not() -> None:
    assert all(set(target) <= GSM7 for target in TABLE.values())
    assert not GSM7.intersection(TABLE)
    assert len(TABLE) >= 250  # Twilio's list, as the calculator carries it


TEXT = st.text(st.sampled_from([*list(TABLE)[::7], "a", "{", "}", "\u00e9", "\U0001f600",
                                "\uff5b", "\uff5d", "\u0436"]), max_size=60)


@settings(max_examples=200, deadline=None)
@given(a=TEXT, b=TEXT)
def test_per_code_point(a: str, b: str) -> None:
    assert smart_encode(a + b) == smart_encode(a) + smart_encode(b)


@settings(max_examples=200, deadline=None)
@given(literal=TEXT, rows=st.lists(TEXT, max_size=6), footer=st.booleans())
def test_a_smart_template_prices_and_renders_the_encoded_text(
        literal: str, rows: list[str], footer: bool) -> None:
    body = literal.replace("{", "{{").replace("}", "}}") + "{v}!"
    plain, smart = Template(body, footer), Template(body, footer, smart_encoding=True)
    variables = [{"v": value} for value in rows]
    assert [smart.render(v) for v in variables] == [
        smart_encode(plain.render(v)) for v in variables]
    assert smart.segments(variables) == [
        count_segments(smart_encode(plain.render(v))).segments for v in variables]


def test_fullwidth_braces_are_encoded_after_placeholders_are_found() -> None:
    template = Template("\uff5bname\uff5d {name}", footer=False, smart_encoding=True)
    assert template.names == ("name",)
    assert template.render({"name": "\u201cA\u201d"}) == "{name} \"A\""


def test_ucs2_characters_and_a_template_without_them() -> None:
    template = Template("Hi {name} \u2014 \U0001f600", footer=False)
    columns = template.columns([{"name": "Zo\u00eb"}, {"name": "Bob"}])
    chars = template.ucs2_characters(columns)
    assert chars == ["\u2014", "\U0001f600", "\u00eb"]
    assert template.without("".join(chars)).render({"name": "Zo\u00eb"}) == "Hi Zo  "
    smart = template.smart_encoded()
    assert smart.ucs2_characters(smart.columns([{"name": "Bob"}])) == ["\U0001f600"]


MIXED = st.text(st.sampled_from(["a", " ", "€", "[", "\u00eb", "\u2019", "\u0436", "\U0001f600",
                                 "\u0301", "{", "}"]), max_size=90)


@settings(max_examples=300, deadline=None)
@given(literal=MIXED, rows=st.lists(st.tuples(MIXED, MIXED), max_size=8))
def test_price_names_the_ucs2_characters_and_the_parts_without_them(
        literal: str, rows: list[tuple[str, str]]) -> None:
    template = Template(literal.replace("{", "{{").replace("}", "}}") + "{a}{b}{a}", False)
    variables = [{"a": a, "b": b} for a, b in rows]
    priced = template.price(template.columns(variables), variables)
    messages = [template.render(v) for v in variables]
    assert priced.parts == [count_segments(m).segments for m in messages]
    assert set(priced.ucs2) == {c for text in [literal, *messages] for c in text} - GSM7
    plain = template.without("".join(priced.ucs2))
    without = priced.without_ucs2
    if isinstance(without, dict):
        without = [without.get(row, parts) for row, parts in enumerate(priced.parts)]
    if without is not None:
        assert without == [count_segments(plain.render(v)).segments for v in variables]
