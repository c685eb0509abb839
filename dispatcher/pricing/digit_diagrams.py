"""Exact decision diagrams over fixed-length digit strings, built from phonenumbers' patterns.

A diagram answers "what is f(s)?" for every string ``s`` of ``length`` ASCII digits by reading
``s`` digit by digit; a leaf reached after ``k`` digits means every string with that prefix has
the leaf's value. Nodes are hash-consed and a node whose ten children are one leaf is that leaf,
so a leaf is reached as soon as the digits read so far decide ``f``. Patterns are turned into
a Thompson NFA from the ``re`` module's own parse tree and then, for one length, into a diagram
by subset construction; anything outside the plain regular subset libphonenumber uses raises
``Unsupported`` (callers then keep matching with ``re``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from functools import cache
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

ALL_DIGITS = (1 << 10) - 1


class Unsupported(ValueError):
    """The pattern uses a construct the diagrams do not model."""


class _Nfa:
    """Thompson NFA over the ten digits; state 0 starts, ``accept`` accepts."""

    def __init__(self, pattern: str) -> None:
        self.moves: list[list[tuple[int, int]]] = []  # state -> [(digit mask, next state)]
        self.free: list[list[int]] = []  # epsilon moves
        self.at_end: list[list[int]] = []  # moves allowed only once every digit is read ('$')
        self.accept = self._items(sre_parse.parse(pattern), self._state())

    def _state(self) -> int:
        self.moves.append([])
        self.free.append([])
        self.at_end.append([])
        return len(self.moves) - 1

    def _step(self, state: int, mask: int) -> int:
        following = self._state()
        if mask:
            self.moves[state].append((mask, following))
        return following

    def _items(self, items: Iterable[tuple[Any, Any]], state: int) -> int:
        for op, arg in items:
            state = self._item(op, arg, state)
        return state

    def _item(self, op: Any, arg: Any, state: int) -> int:
        if op is sre.LITERAL:
            return self._step(state, _digit_mask(arg))
        if op is sre.IN:
            return self._step(state, _set_mask(arg))
        if op is sre.ANY:
            return self._step(state, ALL_DIGITS)
        if op is sre.SUBPATTERN:
            _, add_flags, del_flags, items = arg
            if add_flags or del_flags:
                raise Unsupported(f"flags in a group: {add_flags}, {del_flags}")
            return self._items(items, state)
        if op is sre.BRANCH:
            joined = self._state()
            for items in arg[1]:
                start = self._state()
                self.free[state].append(start)
                self.free[self._items(items, start)].append(joined)
            return joined
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high, items = arg
            return self._repeat(low, high, items, state)
        if op is sre.AT and arg is sre.AT_END:
            following = self._state()
            self.at_end[state].append(following)
            return following
        raise Unsupported(f"{op} {arg}")

    def _repeat(self, low: int, high: int, items: Any, state: int) -> int:
        for _ in range(low):
            state = self._items(items, state)
        if high is sre.MAXREPEAT:
            start = self._state()
            self.free[state].append(start)
            self.free[self._items(items, start)].append(state)
            return state
        for _ in range(high - low):
            start, joined = self._state(), self._state()
            self.free[state] += (start, joined)
            self.free[self._items(items, start)].append(joined)
            state = joined
        return state

    def closure(self, states: Iterable[int], at_end: bool) -> frozenset[int]:
        seen = set(states)
        todo = list(seen)
        while todo:
            state = todo.pop()
            for following in (*self.free[state], *(self.at_end[state] if at_end else ())):
                if following not in seen:
                    seen.add(following)
                    todo.append(following)
        return frozenset(seen)

    def advance(self, states: frozenset[int], digit: int) -> frozenset[int]:
        bit = 1 << digit
        return frozenset(following for state in states for mask, following in self.moves[state]
                         if mask & bit)


def _digit_mask(code: int) -> int:
    return 1 << (code - 48) if 48 <= code <= 57 else 0


def _set_mask(items: list[tuple[Any, Any]]) -> int:
    mask, negate = 0, False
    for op, arg in items:
        if op is sre.LITERAL:
            mask |= _digit_mask(arg)
        elif op is sre.RANGE:
            mask |= sum(_digit_mask(c) for c in range(max(arg[0], 48), min(arg[1], 57) + 1))
        elif op is sre.CATEGORY and arg is sre.CATEGORY_DIGIT:
            mask = ALL_DIGITS
        elif op is sre.NEGATE:
            negate = True
        else:
            raise Unsupported(f"set member {op} {arg}")
    return ALL_DIGITS & ~mask if negate else mask


@cache
def _nfa(pattern: str) -> _Nfa:
    return _Nfa(pattern)


def forget_patterns() -> None:
    """Drop the NFAs kept for building more diagrams: ~140k tracked objects once every calling
    code is built, which each full garbage collection would walk again."""
    _nfa.cache_clear()


class Diagrams:
    """A store of hash-consed nodes; a node is an int, a leaf holds any hashable value."""

    def __init__(self) -> None:
        self.children: list[tuple[int, ...] | None] = []  # None for a leaf
        self.values: list[Hashable] = []
        self._leaves: dict[Hashable, int] = {}
        self._nodes: dict[tuple[int, ...], int] = {}
        self._ite: dict[tuple[int, int, int], int] = {}
        self.false, self.true = self.leaf(False), self.leaf(True)

    def leaf(self, value: Hashable) -> int:
        key = (type(value), value)
        found = self._leaves.get(key)
        if found is None:
            found = self._leaves[key] = len(self.values)
            self.children.append(None)
            self.values.append(value)
        return found

    def node(self, children: tuple[int, ...]) -> int:
        # Only a leaf may stand for a whole level: a node is always read one digit deeper.
        if children.count(children[0]) == len(children) and self.children[children[0]] is None:
            return children[0]
        found = self._nodes.get(children)
        if found is None:
            found = self._nodes[children] = len(self.values)
            self.children.append(children)
            self.values.append(None)
        return found

    def built(self) -> None:
        """Drop what only building needed (reading needs ``children`` and ``values``)."""
        self._nodes.clear()
        self._ite.clear()

    def child(self, node: int, digit: int) -> int:
        children = self.children[node]
        return node if children is None else children[digit]

    def ite(self, condition: int, then: int, other: int) -> int:
        """``then`` where the boolean diagram ``condition`` is true, ``other`` elsewhere."""
        if then == other:
            return then
        if self.children[condition] is None:
            return then if self.values[condition] else other
        key = (condition, then, other)
        found = self._ite.get(key)
        if found is None:
            found = self._ite[key] = self.node(tuple(
                self.ite(self.child(condition, d), self.child(then, d), self.child(other, d))
                for d in range(10)))
        return found

    def all_of(self, nodes: Iterable[int]) -> int:
        result = self.true
        for node in nodes:
            result = self.ite(result, node, self.false)
        return result

    def any_of(self, nodes: Iterable[int]) -> int:
        result = self.false
        for node in nodes:
            result = self.ite(result, self.true, node)
        return result

    def negate(self, node: int) -> int:
        return self.ite(node, self.false, self.true)

    def language(self, pattern: str, length: int, *, prefix: bool = False,
                 nonempty: bool = False) -> int:
        """True for the strings ``pattern`` fullmatches, or (``prefix``) matches at the start
        (``re.match``), with a non-empty match if ``nonempty``."""
        nfa = _nfa(pattern)
        memo: dict[tuple[int, frozenset[int]], int] = {}

        def build(depth: int, reached: frozenset[int]) -> int:
            key = (depth, reached)
            found = memo.get(key)
            if found is not None:
                return found
            states = nfa.closure(reached, at_end=depth == length)
            if nfa.accept in states and (depth == length or prefix) and (depth or not nonempty):
                result = self.true
            elif depth == length or not states:
                result = self.false
            else:
                result = self.node(tuple(build(depth + 1, nfa.advance(states, d))
                                         for d in range(10)))
            memo[key] = result
            return result

        return build(0, frozenset((0,)))

    def walk(self, node: int, digits: str) -> tuple[int, int]:
        """The node reached after reading ``digits`` (stopping at a leaf), and digits read."""
        read = 0
        children = self.children
        for char in digits:
            kids = children[node]
            if kids is None:
                break
            node = kids[ord(char) - 48]
            read += 1
        return node, read

    def is_leaf(self, node: int) -> bool:
        return self.children[node] is None

    def decided_share(self) -> Callable[[int, int], float]:
        """share(node, t): the share of the next ``t`` digits' strings that reach a leaf."""

        @cache
        def share(node: int, digits: int) -> float:
            children = self.children[node]
            if children is None:
                return 1.0
            if digits == 0:
                return 0.0
            return sum(share(child, digits - 1) for child in children) / 10

        return share
