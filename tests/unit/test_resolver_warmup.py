"""The resolver's start-up warm-up: everything built ahead, the same answers, during it too."""

from __future__ import annotations

import asyncio
import random

import pytest

from dispatcher.pricing import digit_diagrams, numbers
from dispatcher.pricing.numbers import CALLING_CODES, CountryResolver
from dispatcher.pricing.warmup import warm_up
from tests.unit.test_numbers import example_numbers, mutants, random_numbers, reference


@pytest.fixture(scope="module")
def sample() -> list[str]:
    rng = random.Random(11)
    examples = example_numbers()
    return [*examples, *(m for n in rng.sample(examples, 300) for m in mutants(n, rng)),
            *random_numbers(rng, 3000)]


@pytest.fixture(scope="module")
def expected(sample: list[str]) -> list[str | None]:
    return [reference(number) for number in sample]


@pytest.fixture
def cold() -> None:
    """Nothing built yet: as in a process just started (the diagrams are cached per process)."""
    numbers._group.cache_clear()


def refuse_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("built on first use after the warm-up")
    monkeypatch.setattr(numbers, "_build", refuse)
    monkeypatch.setattr(numbers, "_diagram", refuse)


@pytest.mark.usefixtures("cold")
async def test_after_the_warm_up_a_preflight_builds_nothing_and_answers_the_same(
        sample: list[str], expected: list[str | None], monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = CountryResolver()
    await warm_up(resolver, asyncio.Event(), rest=0)
    assert resolver.warm_codes == set(CALLING_CODES)
    assert digit_diagrams._nfa.cache_info().currsize == 0  # only building needed them
    refuse_to_build(monkeypatch)
    assert resolver.resolve_many(sample) == expected
    assert [resolver.resolve(number) for number in sample] == expected


@pytest.mark.usefixtures("cold")
async def test_preflights_during_the_warm_up_answer_the_same(
        sample: list[str], expected: list[str | None]) -> None:
    resolver = CountryResolver()
    warming = asyncio.create_task(warm_up(resolver, asyncio.Event(), rest=0))
    overlapped = 0
    while not warming.done() and overlapped < 3:
        if resolver.warm_codes:
            # Started, and unable to finish meanwhile: it needs the loop (busy here) between pieces.
            overlapped += len(resolver.warm_codes) < len(CALLING_CODES)
            assert CountryResolver().resolve_many(sample) == expected  # a memo learning now
            assert [resolver.resolve(number) for number in sample] == expected
        await asyncio.sleep(0.001)
    await warming
    assert overlapped
    assert resolver.warm_codes == set(CALLING_CODES)
    assert resolver.resolve_many(sample) == expected


async def test_the_warm_up_stops_with_the_service() -> None:
    stop = asyncio.Event()
    stop.set()
    resolver = CountryResolver()
    await warm_up(resolver, stop, rest=0)
    assert resolver.warm_codes == set()


async def test_a_second_warm_up_of_the_same_resolver_builds_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = CountryResolver()
    await warm_up(resolver, asyncio.Event(), rest=0)
    calls: list[tuple[int, int | None]] = []
    monkeypatch.setattr(resolver, "warm_up", lambda *piece: calls.append(piece))
    await warm_up(resolver, asyncio.Event(), rest=0)  # another service started in the same process
    assert calls == []
