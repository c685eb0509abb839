"""Classifying many E.164 numbers at once through a memo of the leading digits that decide them.

A memo entry is keyed by a number's first ``k`` characters plus one character for its length
(so a key also says how long the number is); it holds what every number of that length starting
so is: its region, ``""`` (not valid), or how many characters to key on next (the prefix does
not decide yet), or ``PER_NUMBER`` (only the whole number decides, or the national prefix might
touch it: the exact per-number path answers). Entries are learned from exact decision diagrams
(``digit_diagrams``), never guessed from the numbers seen, so the memo is a lazily expanded copy
of libphonenumber's own metadata. Each pass is a handful of C-level ``map`` calls over the
numbers still undecided.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import compress, repeat
from typing import Final, cast

from dispatcher.digit_diagrams import Diagrams

FIRST_KEY: Final = 6  # '+' and five digits: the calling code and, mostly, the range
PER_NUMBER: Final = 0
REFINE: Final = "?"  # a diagram leaf: the national prefix might touch these numbers
_MAX_ENTRIES = 2_000_000  # a full memo is dropped and relearned (it is a cache, never the truth)
_ENOUGH = 0.9  # key on enough digits that this share of strings is decided


@dataclass(frozen=True, slots=True)
class Group:
    """The diagram of one calling code and national number length."""

    diagrams: Diagrams
    root: int
    start: int  # where the national number starts in the E.164 string


Answer = str | int  # a region, "" (not valid), a longer key length, or PER_NUMBER


def is_digit_form(number: str) -> bool:
    """'+' then at least three ASCII digits: the only form the memo keys on."""
    return (number[:1] == "+" and len(number) > 3 and number.isascii()
            and number[1:].isdigit())


def _all_digit_forms(numbers: Sequence[str]) -> bool:
    """``is_digit_form`` of every number, asked of the whole column at once: as many '+' as
    numbers, each right after a separator, and nothing else but ASCII digits."""
    joined = "\n".join(numbers)
    return (joined.isascii() and joined.count("+") == len(numbers)
            and ("\n" + joined).count("\n+") == len(numbers)
            and joined.count("\n") == len(numbers) - 1
            and min(map(len, numbers), default=4) > 3
            and joined.replace("+", "").replace("\n", "").isdigit())


class PrefixMemo:
    """``resolve_many`` by leading digits; ``exact`` answers what the digits cannot."""

    def __init__(self, group: Callable[[str], Group | None],
                 exact: Callable[[str], str | None]) -> None:
        self._group = group  # the group of a number in digit form, None if none is valid
        self._exact = exact
        self._memo: dict[str, Answer] = {}

    def resolve_many(self, numbers: Sequence[str]) -> list[str | None]:
        """The region of each number, or None when it is not valid; in order."""
        if len(self._memo) > _MAX_ENTRIES:
            self._memo.clear()
        if _all_digit_forms(numbers):
            todo: Sequence[int] = range(len(numbers))
            pending = numbers
        else:
            forms = list(map(is_digit_form, numbers))
            todo = list(compress(range(len(numbers)), forms))
            pending = list(compress(numbers, forms))
        answers: list[Answer | None] = [None] * len(numbers)
        keys = [number[:FIRST_KEY] + chr(len(number)) for number in pending]
        while keys:
            found: list[Answer | None] = list(map(self._memo.get, keys))
            for k in compress(range(len(found)), map(operator.not_, found)):
                self._settle(found, k, keys[k], pending[k])
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
        if "" in answers:
            answers = [answer or None for answer in answers]
        return answers  # type: ignore[return-value]

    def _settle(self, found: list[Answer | None], k: int, key: str, number: str) -> None:
        """A memo miss, or a number only the exact path decides; "" (not valid) stays."""
        answer = found[k]
        if answer is None:
            answer = self._memo.get(key)
            if answer is None:
                answer = self._learn(key, number)
        if answer == PER_NUMBER:
            answer = self._exact(number) or ""
        found[k] = answer

    def _learn(self, key: str, number: str) -> Answer:
        """What the diagram says of every number this key covers; remembered."""
        stop, length = len(key) - 1, len(number)
        group = self._group(number)
        answer: Answer
        if group is None:
            answer = ""
        else:
            diagrams = group.diagrams
            node, read = diagrams.walk(group.root, number[group.start:stop])
            if diagrams.is_leaf(node):
                value = diagrams.values[node]
                answer = PER_NUMBER if value == REFINE else str(value or "")
            else:
                answer = _next_stop(diagrams, node, group.start + read, length)
        self._memo[key] = answer
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
