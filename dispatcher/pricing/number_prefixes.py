"""Classifying many E.164 numbers at once through a memo of the leading digits that decide them.

A memo entry holds what every number of one length starting with one prefix is: its region,
``""`` (not valid), how many characters to key on next (the prefix does not decide yet), or
``PER_NUMBER`` (only the whole number decides, or the national prefix might touch it: each such
number takes the exact path). The first key is the number less its last ``TAIL`` characters (one
slice; the key's length gives the number's), later keys a longer prefix plus ``chr(length)``.
Entries are learned from exact decision diagrams (``digit_diagrams``), never guessed from the
numbers seen, so the memo is a lazily expanded copy of libphonenumber's own metadata (dropped
and relearned past ``_MAX_ENTRIES``). Each pass is a handful of C-level ``map``/``compress``
calls over the numbers still undecided.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import compress, repeat
from typing import Final, cast

from dispatcher.pricing.digit_diagrams import Diagrams

FIRST_KEY: Final = 4  # '+' and three digits always name the calling code
TAIL: Final = 6  # the first key leaves out this many last digits: most numbers are decided
PER_NUMBER: Final = 0
REFINE: Final = "?"  # a diagram leaf (alone, or before the region the digits give): the
# national prefix might touch these numbers, so each is checked on its own
_MAX_ENTRIES = 2_000_000  # a full memo is dropped and relearned (it is a cache, never the truth)
_ENOUGH = 0.9  # key on enough digits that this share of strings is decided
_DIGIT_FORM = b"0123456789+\n"


@dataclass(frozen=True, slots=True)
class Group:
    """The diagram of one calling code and national number length."""

    diagrams: Diagrams
    root: int
    start: int  # where the national number starts in the E.164 string


Answer = str | int  # a region, "" (not valid), a longer key length, or PER_NUMBER


def is_digit_form(number: str) -> bool:
    """'+' then ASCII digits: the only form the memo keys on."""
    return number[:1] == "+" and number.isascii() and number[1:].isdigit()


def _all_digit_forms(numbers: Sequence[str]) -> bool:
    """``is_digit_form`` of every number, asked of the whole column at once: each number starts
    with the only '+' it has, and nothing else but ASCII digits."""
    joined = "\n".join(numbers)
    return (joined.isascii() and joined.startswith("+")
            and joined.count("\n") == joined.count("\n+") == len(numbers) - 1
            and joined.count("+") == len(numbers)
            and not joined.encode("ascii").translate(None, _DIGIT_FORM))


class PrefixMemo:
    """``resolve_many`` by leading digits; ``exact`` answers what the digits cannot."""

    def __init__(self, group: Callable[[str], Group | None], exact: Callable[[str], str | None],
                 refine: Callable[[str, str], str | None]) -> None:
        self._group = group  # the group of a number in digit form, None if none is valid
        self._exact = exact
        self._refine = refine  # (number, region its digits give) -> region, once prefix-checked
        self._tails: dict[str, Answer] = {}  # keyed by all but the last TAIL characters
        self._memo: dict[str, Answer] = {}  # keyed by a prefix and chr(the number's length)
        self._refined: dict[str, str] = {}  # PER_NUMBER keys whose digits name a region

    def resolve_many(self, numbers: Sequence[str]) -> list[str | None]:
        """The region of each number, or None when it is not valid; in order."""
        if len(self._memo) + len(self._tails) > _MAX_ENTRIES:
            self._memo.clear()
            self._tails.clear()
            self._refined.clear()
        if _all_digit_forms(numbers):
            todo: Sequence[int] = range(len(numbers))
            pending = numbers
        else:
            forms = list(map(is_digit_form, numbers))
            todo = list(compress(range(len(numbers)), forms))
            pending = list(compress(numbers, forms))
        answers: list[Answer | None] = [None] * len(numbers)
        # First all but the last TAIL characters (one slice, and the key's length gives the
        # number's), then a prefix of the length the diagram asked for, plus the length.
        keys = [number[:-TAIL] for number in pending]
        memo, tail = self._tails, True
        while keys:
            found: list[Answer | None] = list(map(memo.get, keys))
            for k in compress(range(len(found)), map(operator.not_, found)):
                found[k] = self._settle(found[k], keys[k], pending[k], tail)
            if len(found) == len(answers):
                answers = found
            else:
                deque(map(answers.__setitem__, todo, found), maxlen=0)
            again = list(map(operator.is_not, map(type, found), repeat(str)))
            if not any(again):
                break
            todo, pending = list(compress(todo, again)), list(compress(pending, again))
            stops = cast("list[int]", list(compress(found, again)))
            keys = [number[:stop] + chr(len(number))
                    for number, stop in zip(pending, stops, strict=True)]
            memo, tail = self._memo, False
        if "" in answers:
            answers = [answer or None for answer in answers]
        return answers  # type: ignore[return-value]

    def _settle(self, answer: Answer | None, key: str, number: str, tail: bool) -> Answer:
        """A memo miss, or a number only the exact path decides; "" (not valid) stays."""
        memo = self._tails if tail else self._memo
        if answer is None:
            answer = memo.get(key)
            if answer is None:
                answer = memo[key] = self._learn(key, number, tail)
        if answer == PER_NUMBER:
            region = self._refined.get(f"{tail:d}{key}")
            answer = (self._refine(number, region) if region else self._exact(number)) or ""
        return answer

    def _learn(self, key: str, number: str, tail: bool) -> Answer:
        """What the diagram says of every number this key covers."""
        stop = len(key) if tail else len(key) - 1
        if stop < FIRST_KEY:  # a tail key this short may stand for several lengths
            return PER_NUMBER
        group = self._group(number)
        if group is None:
            return ""
        diagrams = group.diagrams
        node, read = diagrams.walk(group.root, number[group.start:stop])
        if not diagrams.is_leaf(node):
            return _next_stop(diagrams, node, group.start + read, len(number))
        answer = str(diagrams.values[node] or "")
        if answer.startswith(REFINE):
            if answer != REFINE:
                self._refined[f"{tail:d}{key}"] = answer[len(REFINE):]
            return PER_NUMBER
        return answer


def _next_stop(diagrams: Diagrams, node: int, stop: int, length: int) -> int:
    """A longer key: enough digits to decide most numbers under this node."""
    share = _shares(diagrams)
    for more in range(1, length - stop):
        if share(node, more) >= _ENOUGH:
            return stop + more
    return PER_NUMBER


@cache
def _shares(diagrams: Diagrams) -> Callable[[int, int], float]:
    return diagrams.decided_share()
