"""E.164 recipients: the fast resolver must agree with phonenumbers itself, number for number."""

from __future__ import annotations

import random

import phonenumbers
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from dispatcher.errors import InvalidRecipient
from dispatcher.pricing.numbers import CountryResolver, canonical_number, country_of, mask

E164 = PhoneNumberFormat.E164
TYPES = [getattr(PhoneNumberType, name) for name in dir(PhoneNumberType) if name.isupper()]


@pytest.fixture(scope="module")
def resolver() -> CountryResolver:
    return CountryResolver()


def reference_canonical(number: str) -> tuple[str, str] | None:
    """phonenumbers' answer for '+' and ASCII digits (up to 31): (region, E.164) if valid.

    A form it rewrites (a national trunk prefix or carrier code after the country code) is
    valid, with the rewritten form as its canonical one.
    """
    if not (number[:1] == "+" and number.isascii() and number[1:].isdigit()
            and 3 < len(number) <= 32):
        return None
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.region_code_for_number(parsed), phonenumbers.format_number(parsed, E164)


def reference(number: str) -> str | None:
    """The region ``reference_canonical`` gives, or None."""
    found = reference_canonical(number)
    return None if found is None else found[0]


def example_numbers() -> list[str]:
    """phonenumbers' example number of every type for every region and non-geographic code."""
    found = [phonenumbers.example_number_for_type(region, kind)
             for region in sorted(phonenumbers.SUPPORTED_REGIONS) for kind in TYPES]
    found += [phonenumbers.example_number_for_non_geo_entity(code)
              for code in sorted(phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS)]
    return sorted({phonenumbers.format_number(n, E164) for n in found if n is not None})


def mutants(number: str, rng: random.Random) -> list[str]:
    """Near misses: too short, too long, changed digits, a national prefix kept, no '+'."""
    digits = "0123456789"
    changed = [number[:i] + rng.choice(digits) + number[i + 1:]
               for i in rng.sample(range(2, len(number)), min(6, len(number) - 2))]
    cut = rng.randrange(2, 4)
    return [number[:-1], number[:-2], number + rng.choice(digits), number + "00", number[1:],
            number[:cut] + "0" + number[cut:], number[:cut] + "8" + number[cut:],
            number[:cut] + "1" + number[cut:], number + "\n", number[:cut] + " " + number[cut:],
            *changed]


def random_numbers(rng: random.Random, count: int) -> list[str]:
    """Random digits after real calling codes, of every plausible length."""
    codes = [str(code) for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE]
    return ["+" + rng.choice(codes) + "".join(rng.choices("0123456789", k=rng.randrange(1, 16)))
            for _ in range(count)]


# Forms that reach the national-prefix and transform rules (RU 8xx, AR 15, MG, SM, JP, …).
PREFIX_CASES = ["+78123456789", "+78121234567", "+5491123456789", "+541115123456",
                "+2612012345", "+26120123456", "+378812345", "+3780549812345", "+810312345678",
                "+4407400123456", "+112125550123", "+441800201234", "+3700800123", "+375801234567",
                "+611831123456", "+86179123456789", "+5590211234567", "+2410612345678",
                # Digits phonenumbers reads but E.164 does not: full-width, Arabic-Indic.
                "+\uff14\uff14\uff17\uff14\uff10\uff10\uff11\uff12\uff13\uff14\uff15\uff16",
                "+\u0664\u0664\u0667\u0664\u0660\u0660\u0661\u0662\u0663\u0664\u0665\u0666"]


def test_resolver_agrees_with_phonenumbers_on_a_large_sample(resolver: CountryResolver) -> None:
    rng = random.Random(20240611)
    examples = example_numbers()
    sample = examples + PREFIX_CASES + random_numbers(rng, 6000)
    sample += [m for number in examples for m in mutants(number, rng)]
    expected = [reference(number) for number in sample]
    got = resolver.resolve_many(sample)
    wrong = [(n, g, e) for n, g, e in zip(sample, got, expected, strict=True) if g != e]
    assert wrong == [], f"{len(wrong)} disagreements, e.g. {wrong[:10]}"
    valid = {region for region in expected if region is not None}
    # The sample must really cover valid numbers of nearly every region, and many invalid ones.
    assert len(valid) > 240 and {"US", "CA", "JM", "GB", "JE", "GG", "IM", "KZ", "001"} <= valid
    assert expected.count(None) > 5000 and len(sample) - expected.count(None) > 3000


@pytest.mark.parametrize(("number", "canonical"), [
    ("+4407400123456", "+447400123456"), ("+112125550123", "+12125550123"),
    ("+2612012345", "+261202012345"), ("+9203001234567", "+923001234567"),
])
def test_national_forms_that_phonenumbers_rewrites_are_valid_in_canonical_form(
        resolver: CountryResolver, number: str, canonical: str) -> None:
    assert phonenumbers.is_valid_number(phonenumbers.parse(number))
    assert canonical_number(number) == canonical == canonical_number(canonical)
    assert resolver.resolve(number) == resolver.resolve(canonical) == country_of(number)
    regions, numbers = CountryResolver().resolve_canonical([canonical, number, "+1"])
    assert list(numbers) == [canonical, canonical, "+1"]
    assert regions[0] == regions[1] is not None and regions[2] is None


def test_resolve_canonical_agrees_with_phonenumbers(resolver: CountryResolver) -> None:
    rng = random.Random(3)
    examples = example_numbers()
    sample = examples + PREFIX_CASES + [m for number in examples for m in mutants(number, rng)]
    for _ in range(2):  # cold, then every key from the memo
        regions, numbers = resolver.resolve_canonical(sample)
        for number, region, canonical in zip(sample, regions, numbers, strict=True):
            expected = reference_canonical(number)
            assert (region, canonical) == (expected or (None, number)), number
            assert canonical_number(number) == (expected and expected[1]), number


@pytest.mark.parametrize(("region", "number"), [
    ("US", "+12015550123"), ("US", "+14155552671"), ("US", "+12125550123"),
    ("CA", "+16045550123"), ("CA", "+14165550123"), ("CA", "+15062345678"),
    ("JM", "+18765230123"), ("JM", "+18762345678"),
    ("GB", "+447400123456"), ("JE", "+441534123456"), ("GG", "+447781123456"),
    ("IM", "+447624123456"), ("RU", "+79123456789"), ("RU", "+78123456789"),
    ("KZ", "+77012345678"), ("VA", "+390669812345"), ("001", "+80012345678"),
])
def test_country_of_shared_calling_codes(region: str, number: str) -> None:
    assert country_of(number) == region == reference(number)


@pytest.mark.parametrize("region", ["US", "CA", "JM", "PR", "BS", "GB", "JE", "GG", "IM", "RU",
                                    "KZ"])
def test_country_of_phonenumbers_fixed_line_examples(region: str) -> None:
    example = phonenumbers.example_number_for_type(region, PhoneNumberType.FIXED_LINE)
    assert example is not None
    assert country_of(phonenumbers.format_number(example, E164)) == region


def test_country_of_follows_phonenumbers_even_where_its_order_decides() -> None:
    # IM's example mobile is also valid for GB, which phonenumbers tries first.
    assert country_of("+447924123456") == "GB" == reference("+447924123456")


@pytest.mark.parametrize("number", [
    "14155552671", "", "+", "+1", "+12", "001 415 555 2671", "+1415555267a", "+1 415 555 2671",
    "+1-415-555-2671", "tel:+14155552671", "+\uff11\uff14\uff11\uff15\uff15\uff15\uff15\uff12"
    "\uff16\uff17\uff11", "+\u0661\u0664\u0661\u0665\u0665\u0665\u0665\u0662\u0666\u0667\u0661",
])
def test_country_of_rejects_what_is_not_e164(number: str) -> None:
    with pytest.raises(InvalidRecipient, match=r"not in E\.164 form"):
        country_of(number)


@pytest.mark.parametrize("number", [
    "+1415555267", "+141555526711", "+11235550123", "+15550000000", "+441481123456",
    "+882123456789", "+0123456789", "+999123456789", "+123", "+12345678901234567890",
])
def test_country_of_rejects_invalid_numbers(number: str) -> None:
    with pytest.raises(InvalidRecipient, match="not a valid phone number") as caught:
        country_of(number)
    assert number not in str(caught.value.details)


@pytest.mark.parametrize(("number", "masked"), [
    ("+12025550167", "+1********67"), ("+447400123456", "+44********56"),
    ("+2612012345", "+261*****45"), ("+80012345678", "+800******78"),
    ("+1234", "+1***"), ("+0123456789", "+********89"), ("12025550167", "***"), ("", "***"),
])
def test_mask_keeps_only_country_code_and_last_digits(number: str, masked: str) -> None:
    assert mask(number) == masked
    assert number == "" or number not in mask(number)
