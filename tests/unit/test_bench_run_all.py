"""`make bench` runs every benchmark module with flags that module really accepts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.run_all import BENCHMARKS, commands


def test_every_benchmark_is_listed_in_order() -> None:
    modules = [command[2] for command in commands([])]
    assert modules == [argv[0] for argv in BENCHMARKS.values()]


def test_only_selects_and_rejects_unknown_names() -> None:
    assert [c[2:] for c in commands(["preflight"])] == [BENCHMARKS["preflight"]]
    with pytest.raises(SystemExit, match="unknown benchmark"):
        commands(["nope"])


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_flags_are_accepted_by_the_module(name: str) -> None:
    module, *args = BENCHMARKS[name]
    shown = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                           text=True, check=True, timeout=60).stdout
    for flag in (arg for arg in args if arg.startswith("--")):
        assert flag in shown, f"{module} has no {flag}"
