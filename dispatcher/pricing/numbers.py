"""E.164 recipients: validity and country exactly as ``phonenumbers`` decides, but fast; masking.

``phonenumbers.parse`` + ``is_valid_number`` costs tens of µs a number; a broadcast pre-flight
classifies 100k numbers in milliseconds. ``CountryResolver.resolve`` compiles phonenumbers' own
metadata, per calling code (on the first number with that code) and national number length,
into one regex whose matching branch names the region, so one ``fullmatch`` answers both
questions. ``resolve_many`` answers most numbers from their leading digits alone
(``number_prefixes``): the same metadata pieces, in the same branch order, become exact decision
diagrams (``digit_diagrams``) that say where the leading digits already decide.

One rule decides every entry point (job contract, pre-flight, broadcasts, opt-outs, duplicates):
``canonical_number``. A number is '+' and ASCII digits (no spaces, no national digits) that
``phonenumbers`` parses to a valid number, by its own length rules; its canonical form is
``format_number(..., E164)``. So a national trunk prefix written after the country code
(``+92 0300…``, ``+44 07911…``) is accepted and dropped. The fast paths send every number such a
prefix (or carrier code) might touch to phonenumbers itself, which also gives its canonical form.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import phonenumbers
from phonenumbers import PhoneMetadata, PhoneNumberDesc

from dispatcher.errors import InvalidRecipient
from dispatcher.pricing.digit_diagrams import Diagrams, Unsupported
from dispatcher.pricing.number_prefixes import REFINE, Group, PrefixMemo

NON_GEOGRAPHIC = phonenumbers.REGION_CODE_FOR_NON_GEO_ENTITY  # "001": +800, +808, +870, …
CALLING_CODES: tuple[int, ...] = tuple(sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE))
_CALLING_CODES = frozenset(map(str, CALLING_CODES))
_MIN_DIGITS = 3  # fewer digits after '+': phonenumbers' TOO_SHORT_AFTER_IDD
MAX_NUMBER_CHARS = 32  # '+' and up to 31 digits: a calling code, a trunk prefix, 17 digits
NSN_LENGTHS = range(2, 18)  # phonenumbers' national number limits (TOO_SHORT_NSN, TOO_LONG)
# The number types ``_number_type_helper`` tries; mobile joins them unless it equals fixed line.
# Any match makes a number valid, so the common types go first: the regex tries them first.
_TYPES = ("fixed_line", "premium_rate", "toll_free", "shared_cost", "voip", "personal_number",
          "pager", "uan", "voicemail")


@dataclass(frozen=True, slots=True)
class _Length:
    """The regexes for one calling code and one national number length."""

    regex: re.Pattern[str]  # may first route numbers a national prefix could touch to ""
    regions: dict[int, str]  # regex group number -> region; "" means "check the prefix"
    plain: re.Pattern[str]  # the same without that route
    plain_regions: dict[int, str]


@dataclass(frozen=True, slots=True)
class _Code:
    """What one country calling code needs: per-length regexes and its national prefix rule."""

    start: int  # where the national number starts: after '+' and the calling code
    by_length: dict[int, _Length]
    prefix: re.Pattern[str] | None  # national_prefix_for_parsing of the code's main region
    transforms: bool  # that prefix has a transform rule
    general: re.Pattern[str] | None  # the main region's general pattern


def _metadata(code: int, region: str) -> PhoneMetadata | None:
    """Region (or non-geographic entity) metadata, as ``is_valid_number_for_region`` loads it."""
    return PhoneMetadata.metadata_for_region_or_calling_code(code, region)


def _pattern(desc: PhoneNumberDesc | None, length: int) -> str | None:
    """The desc's pattern if a national number of this length may match it (as phonenumbers)."""
    if desc is None or not desc.national_number_pattern:
        return None
    if desc.possible_length and length not in desc.possible_length:
        return None
    return desc.national_number_pattern


def _valid_pieces(meta: PhoneMetadata, length: int) -> tuple[str, list[str]] | None:
    """The general pattern and the type patterns ``_number_type_helper`` tries at this length."""
    general = _pattern(meta.general_desc, length)
    names = _TYPES if meta.same_mobile_and_fixed_line_pattern else ("mobile", *_TYPES)
    types = [p for name in names if (p := _pattern(getattr(meta, name), length)) is not None]
    if general is None or not types:
        return None
    return general, types


def _valid_pattern(meta: PhoneMetadata, length: int) -> str | None:
    """A regex for national numbers of this length that ``_number_type_helper`` finds a type for."""
    pieces = _valid_pieces(meta, length)
    if pieces is None:
        return None
    general, types = pieces
    return f"(?=(?:{general})\\Z)(?:{'|'.join(f'(?:{p})' for p in types)})"


def _branches(code: int, length: int) -> tuple[str, dict[str, str]] | None:
    """Alternation of region branches in phonenumbers' order, each group named after its region.

    With several regions, the first whose leading digits match wins even if the number is not
    valid there, so each later branch excludes the earlier regions' leading digits.
    """
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE[code]
    shared = len(regions) > 1
    branches: list[str] = []
    names: dict[str, str] = {}
    earlier: list[str] = []
    for index, region in enumerate(regions):
        meta = _metadata(code, region)
        if meta is None:
            continue
        lead = meta.leading_digits if shared else None
        valid = _valid_pattern(meta, length)
        if valid is not None:
            guard = f"(?!{'|'.join(f'(?:{e})' for e in earlier)})" if earlier else ""
            ahead = f"(?=(?:{lead}))" if lead is not None else ""
            names[f"r{index}"] = region
            branches.append(f"(?P<r{index}>{guard}{ahead}{valid})")
        if lead is not None:
            earlier.append(lead)
    return ("|".join(branches), names) if branches else None


@cache
def _compile(pattern: str) -> re.Pattern[str]:
    """Compile once (lengths of a code often share a pattern); ``\\d`` means ASCII digits only."""
    return re.compile(pattern, re.ASCII)


def _groups(regex: re.Pattern[str], names: dict[str, str]) -> dict[int, str]:
    """Group number -> region, for ``match.lastindex`` (the branch group closes last)."""
    return {regex.groupindex[name]: region for name, region in names.items()}


def _length(branches: str, names: dict[str, str], route: str | None) -> _Length:
    """The regexes for one length; ``route`` catches numbers a national prefix could touch."""
    plain = _compile(branches)
    if route is None:
        return _Length(plain, _groups(plain, names), plain, _groups(plain, names))
    regex = _compile(f"(?P<prefix>{route}\\d*)|{branches}")
    return _Length(regex, _groups(regex, {**names, "prefix": ""}), plain, _groups(plain, names))


def _build(code: int) -> _Code:
    """Compile everything one calling code needs."""
    main = _metadata(code, phonenumbers.region_code_for_country_code(code))
    prefix = main.national_prefix_for_parsing if main is not None else None
    transforms = bool(main is not None and main.national_prefix_transform_rule)
    # Any match may transform; a plain strip needs a non-empty match (lookbehind: not at 0).
    route = None if not prefix else (
        f"(?=(?:{prefix}))" if transforms else f"(?=(?:{prefix})(?<=\\d))")
    general = main.general_desc if main is not None else None
    by_length: dict[int, _Length] = {}
    for length in NSN_LENGTHS:
        built = _branches(code, length)
        if built is not None:
            by_length[length] = _length(*built, route)
    return _Code(
        start=1 + len(str(code)), by_length=by_length,
        prefix=_compile(prefix) if prefix else None, transforms=transforms,
        general=_compile(general.national_number_pattern)
        if general is not None and general.national_number_pattern else None)


def _exact(number: str) -> tuple[str, str] | None:
    """The slow reference, the one rule itself: (region, canonical E.164) or None."""
    if not _is_e164_form(number):
        return None
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    region = phonenumbers.region_code_for_number(parsed)
    if region is None:  # a valid number always has one; kept for the type checker
        return None
    return region, phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def canonical_number(number: str) -> str | None:
    """The one rule: the canonical E.164 form of a valid number, None when it is not valid.

    Valid means '+' then ASCII digits that ``phonenumbers`` calls a valid number; a national
    trunk prefix or carrier code after the country code is dropped (``+920300…`` ->
    ``+92300…``). ``CountryResolver`` answers the same for many numbers at once.
    """
    found = _exact(number)
    return None if found is None else found[1]


def _prefix_may_apply(code: _Code, nsn: str) -> bool:
    """Whether parsing might strip or transform a national prefix of this valid national number.

    Mirrors ``_maybe_strip_national_prefix_carrier_code``: an empty match leaves the number as is,
    and a plain strip is undone when the original is viable but the rest is not. Only numbers
    this cannot clear (e.g. RU/AR/SM oddities) go to the exact path.
    """
    assert code.prefix is not None
    match = code.prefix.match(nsn)
    if match is None:
        return False
    if code.transforms and match.groups() and match.groups()[-1] is not None:
        return True
    if match.end() == 0:
        return False
    return code.general is None or code.general.fullmatch(nsn[match.end():]) is not None


def _is_e164_form(number: str) -> bool:
    """'+' then ASCII digits only (at least three, as phonenumbers needs; at most 31)."""
    return (number[:1] == "+" and number.isascii() and number[1:].isdigit()
            and _MIN_DIGITS < len(number) <= MAX_NUMBER_CHARS)


class CountryResolver:
    """Fast, exact classification of E.164 numbers: region code, or None when not valid."""

    def __init__(self) -> None:
        self._codes: dict[str, _Code] = {}  # compiled on first use: ~1,200 regexes in all
        self._memo = PrefixMemo(self._group, self.resolve, self._refine)
        self._warm: set[tuple[int, int | None]] = set()
        # Valid numbers not in canonical form, as the exact path met them: number -> canonical.
        self._rewrites: dict[str, str] = {}
        self._rewritten = 0  # how many times the exact path met one (a change means: look)

    def warm_up(self, code: int, length: int | None = None) -> None:
        """Build now what the first number with this calling code would: its regexes (no
        ``length``) or its diagram for national numbers of ``length``, one of ``NSN_LENGTHS``.

        Safe in another thread while this resolver answers: each piece is built whole before
        it is stored (a dict item or a cache entry), and one built twice is the same.
        """
        calling = str(code)
        if length is None:
            if calling not in self._codes:
                self._codes[calling] = _build(code)
        else:
            _group(code, length, 1 + len(calling))
        self._warm.add((code, length))

    def warmed(self, code: int, length: int | None = None) -> bool:
        """Whether ``warm_up(code, length)`` has run on this resolver."""
        return (code, length) in self._warm

    @property
    def warm_codes(self) -> frozenset[int]:
        """The calling codes whose regexes and diagrams ``warm_up`` has all built."""
        pieces = Counter(code for code, _ in self._warm.copy())  # copy: it may grow meanwhile
        return frozenset(code for code, built in pieces.items() if built == 1 + len(NSN_LENGTHS))

    def resolve(self, number: str) -> str | None:
        """The region ('US', 'CA', 'JM', …, '001' for non-geographic) or None if invalid."""
        # The regexes accept ASCII digits only, so they also check the form after the code.
        if number[:1] != "+" or len(number) > MAX_NUMBER_CHARS:
            return None
        get = self._codes.get
        code = get(number[1:2]) or get(number[1:3]) or get(number[1:4]) or self._load(number)
        if code is None:
            return None
        nsn = number[code.start:]
        entry = code.by_length.get(len(nsn))
        if entry is None:  # no valid number has this length, unless a national prefix goes
            return self._exact(number) if _on_prefix_route(code, nsn) else None
        match = entry.regex.fullmatch(nsn)
        if match is None:
            return None
        return entry.regions[match.lastindex or 0] or self._route(code, entry, number, nsn)

    def resolve_many(self, numbers: Sequence[str]) -> list[str | None]:
        """``resolve`` for each number, in order: by leading digits wherever they decide."""
        return self._memo.resolve_many(numbers)

    def resolve_canonical(self, numbers: Sequence[str],
                          ) -> tuple[list[str | None], Sequence[str]]:
        """``resolve_many``, and each number in canonical form (``canonical_number``; an
        invalid number as it is). ``numbers`` itself when none needed rewriting (the usual)."""
        if len(self._rewrites) > _MAX_REWRITES:
            self._rewrites.clear()
        seen = self._rewritten
        regions = self._memo.resolve_many(numbers)
        if self._rewritten == seen:
            return regions, numbers
        return regions, list(map(self._rewrites.get, numbers, numbers))

    def _exact(self, number: str) -> str | None:
        """phonenumbers' answer for one number; a valid non-canonical form is remembered."""
        found = _exact(number)
        if found is None:
            return None
        region, canonical = found
        if canonical != number:
            self._rewrites[number] = canonical
            self._rewritten += 1
        return region

    def _route(self, code: _Code, entry: _Length, number: str, nsn: str) -> str | None:
        """A number the national prefix might touch: find its region, then make sure."""
        match = entry.plain.fullmatch(nsn)
        if match is None or _prefix_may_apply(code, nsn):
            return self._exact(number)
        return entry.plain_regions[match.lastindex or 0]

    def _load(self, number: str) -> _Code | None:
        """Compile the calling code that starts this number, if one does."""
        calling = _calling_code(number[1:4])
        if not calling:
            return None
        code = self._codes[calling] = _build(int(calling))
        return code

    def _refine(self, number: str, region: str) -> str | None:
        """A valid number of ``region`` whose national prefix might apply: make sure."""
        code = self._codes.get(_calling_code(number[1:4])) or self._load(number)
        assert code is not None
        return self._exact(number) if _prefix_may_apply(code, number[code.start:]) else region

    def _group(self, number: str) -> Group | None:
        """The diagram for this number's calling code and length (in digit form)."""
        calling = _calling_code(number[1:4])
        if not calling:
            return None
        start = 1 + len(calling)
        length = len(number) - start
        if length not in NSN_LENGTHS:  # too long, unless a national prefix goes: number by number
            return _LONG if NSN_LENGTHS.stop <= length <= MAX_NUMBER_CHARS else None
        return _group(int(calling), length, start)


@cache
def _group(code: int, length: int, start: int) -> Group | None:
    try:
        diagrams, root = _diagram(code, length)
        diagrams.built()
        return Group(diagrams, root, start)
    except Unsupported:
        diagrams = Diagrams()
        return Group(diagrams, diagrams.leaf(REFINE), start)  # every number: the exact path


def _diagram(code: int, length: int) -> tuple[Diagrams, int]:
    """What ``resolve`` answers for each national number of this length, as one diagram:
    the region, None, or ``REFINE`` (+ the region, if valid as written: the national prefix
    might touch it, see ``_refine``). Mirrors ``_branches``
    and the route ``_build`` gives national-prefix numbers."""
    diagrams = Diagrams()
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE[code]
    shared = len(regions) > 1
    branches: list[tuple[int, str]] = []
    earlier = diagrams.false
    for region in regions:
        meta = _metadata(code, region)
        if meta is None:
            continue
        lead = (diagrams.language(meta.leading_digits, length, prefix=True)
                if shared and meta.leading_digits is not None else None)
        pieces = _valid_pieces(meta, length)
        if pieces is not None:
            general, types = pieces
            valid = diagrams.all_of([
                diagrams.negate(earlier), diagrams.true if lead is None else lead,
                diagrams.language(general, length),
                diagrams.any_of(diagrams.language(t, length) for t in types)])
            branches.append((valid, region))
        if lead is not None:
            earlier = diagrams.any_of((earlier, lead))
    result = diagrams.leaf(None)
    for valid, region in reversed(branches):
        result = diagrams.ite(valid, diagrams.leaf(region), result)
    main = _metadata(code, phonenumbers.region_code_for_country_code(code))
    prefix = main.national_prefix_for_parsing if main is not None else None
    if prefix:
        transforms = bool(main is not None and main.national_prefix_transform_rule)
        route = diagrams.language(prefix, length, prefix=True, nonempty=not transforms)
        # Not valid as written, but parsing may strip the prefix: phonenumbers decides.
        refined = diagrams.leaf(REFINE)
        for valid, region in reversed(branches):
            refined = diagrams.ite(valid, diagrams.leaf(REFINE + region), refined)
        result = diagrams.ite(route, refined, result)
    return diagrams, result


def _on_prefix_route(code: _Code, nsn: str) -> bool:
    """Whether parsing might strip or transform a national prefix at the start of ``nsn``."""
    return code.prefix is not None and code.prefix.match(nsn) is not None


def _every_number_exact() -> Group:
    """A group whose every number takes the exact path."""
    diagrams = Diagrams()
    return Group(diagrams, diagrams.leaf(REFINE), 0)


_LONG = _every_number_exact()
_MAX_REWRITES = 100_000


@cache
def default_resolver() -> CountryResolver:
    """The process-wide resolver: each calling code's regexes and diagrams are built on first use
    (a few ms for most codes; +1, shared by 25 regions, ~150 ms), or ahead of it by the
    service's warm-up (``resolver_warmup``)."""
    return CountryResolver()


def country_of(number: str) -> str:
    """ISO 3166 alpha-2 region of a valid E.164 number ('001' for non-geographic services)."""
    if not _is_e164_form(number):
        raise InvalidRecipient("recipient is not in E.164 form ('+' then digits)",
                               recipient=mask(number))
    region = default_resolver().resolve(number)
    if region is None:
        raise InvalidRecipient("recipient is not a valid phone number", recipient=mask(number))
    return region



def _calling_code(digits: str) -> str:
    """The country calling code that starts these digits, or '' if none does."""
    return next((digits[:n] for n in (1, 2, 3) if digits[:n] in _CALLING_CODES), "")


def mask(number: str) -> str:
    """A number safe for logs: country code and last two digits only ('+1********67')."""
    if not _is_e164_form(number):
        return "***"
    digits = number[1:]
    code = _calling_code(digits)
    hidden = len(digits) - len(code)
    shown = 2 if hidden > 4 else 0
    return f"+{code}{'*' * (hidden - shown)}{digits[len(digits) - shown:]}"
