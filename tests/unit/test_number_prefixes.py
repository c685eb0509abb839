"""The prefix memo and its decision diagrams must give phonenumbers' answer for every number."""

from __future__ import annotations

import random
import re

import phonenumbers
import pytest

from dispatcher.pricing.digit_diagrams import Diagrams, Unsupported
from dispatcher.pricing.numbers import CountryResolver
from tests.unit.test_numbers import PREFIX_CASES, example_numbers, mutants, reference

DIGITS = "0123456789"


def around(number: str, rng: random.Random, count: int) -> list[str]:
    """Numbers sharing a prefix of random length with ``number``, of its length and a digit
    either side: many share leading digits, so memo entries are both learned and reused."""
    out = []
    for _ in range(count):
        keep = rng.randrange(2, len(number) + 1)
        length = len(number) + rng.choice((-1, 0, 0, 0, 1))
        out.append(number[:keep] + "".join(rng.choices(DIGITS, k=max(0, length - keep))))
    return out


def test_resolve_many_agrees_with_phonenumbers_on_clustered_numbers() -> None:
    rng = random.Random(5)
    examples = example_numbers()
    sample = PREFIX_CASES + [n for e in examples for n in around(e, rng, 40)]
    sample += [m for e in examples for m in mutants(e, rng)]
    sample += ["", "+", "+1", "+12", "+123", "1234567", "+1-212-555-0123", "+1\n2125550123",
               "+\u0661\u0662\u0663\u0664\u0665\u0666", "+44\u00a07400123456"]
    rng.shuffle(sample)
    expected = [reference(number) for number in sample]
    resolver = CountryResolver()
    cold = resolver.resolve_many(sample)  # learns as it goes
    warm = resolver.resolve_many(sample[::-1])[::-1]  # every key now from the memo
    pieces = [resolver.resolve_many(sample[i:i + 997]) for i in range(0, len(sample), 997)]
    for got in (cold, warm, [region for piece in pieces for region in piece]):
        wrong = [(n, g, e) for n, g, e in zip(sample, got, expected, strict=True) if g != e]
        assert wrong == [], f"{len(wrong)} disagreements, e.g. {wrong[:10]}"
    valid = {region for region in expected if region is not None}
    assert len(valid) > 240 and expected.count(None) > 10_000
    assert len(sample) - expected.count(None) > 20_000


def test_numbers_not_in_digit_form_do_not_stop_the_others_being_resolved() -> None:
    resolver = CountryResolver()
    numbers = ["+14155552671", "+1 415 555 2671", "+447400123456", "+4474001234\uff156"]
    assert resolver.resolve_many(numbers) == ["US", None, "GB", None]
    assert resolver.resolve_many([]) == []


def test_resolve_many_equals_resolve_for_random_digits_after_every_calling_code() -> None:
    rng = random.Random(11)
    codes = [str(code) for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE]
    sample = ["+" + rng.choice(codes) + "".join(rng.choices(DIGITS, k=rng.randrange(1, 16)))
              for _ in range(30_000)]
    resolver = CountryResolver()
    assert resolver.resolve_many(sample) == list(map(resolver.resolve, sample))


PATTERNS = [r"(?:2(?:0[1-35-9]|1[02-9])|3(?:0[1-47-9]))[2-9]\d{6}",
            r"33[0-24-9]\d[46]\d{4}|3(?:33|5\d)\d[7-9]\d{4}",
            r"0?(?:(11|2(?:2(?:02?|[13]|2[13-79])))15)?", r"\d{2,5}$|7\d?",
            r"(?:1|2)?3?\d{0,3}", r"[^0-4]\d*", r"8(?:00|1)?"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_diagram_decides_exactly_what_re_decides(pattern: str) -> None:
    rng = random.Random(pattern)
    regex = re.compile(pattern, re.ASCII)
    for length in range(9):
        diagrams = Diagrams()
        full = diagrams.language(pattern, length)
        start = diagrams.language(pattern, length, prefix=True)
        nonempty = diagrams.language(pattern, length, prefix=True, nonempty=True)
        for _ in range(400):
            text = "".join(rng.choices(DIGITS, k=length))
            matched = regex.match(text)
            some = re.match(f"(?=(?:{pattern})(?<=\\d))", text, re.ASCII) is not None
            for root, want in ((full, regex.fullmatch(text) is not None),
                               (start, matched is not None), (nonempty, some)):
                node, read = diagrams.walk(root, text)
                assert diagrams.is_leaf(node) and diagrams.values[node] == want, (text, read)
                # A leaf reached early is the answer for every way the text could go on.
                other = text[:read] + "".join(rng.choices(DIGITS, k=length - read))
                assert diagrams.values[diagrams.walk(root, other)[0]] == want


@pytest.mark.parametrize("pattern", [r"(\d)\1", r"\d(?=1)", r"(?i:1)", r"^1"])
def test_a_construct_the_diagrams_do_not_model_is_refused(pattern: str) -> None:
    with pytest.raises(Unsupported):
        Diagrams().language(pattern, 3)
