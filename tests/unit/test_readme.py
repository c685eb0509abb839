"""The README stays true: every setting and every metric it must document is there."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import phonenumbers
from prometheus_client import CollectorRegistry

from dispatcher.metrics import Metrics
from dispatcher.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_documented_by_its_variable_name() -> None:
    missing = [f.name for f in fields(Settings) if f"DISPATCHER_{f.name.upper()}" not in README]
    assert not missing, f"README lacks DISPATCHER_ variables for {missing}"


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    exposed = {family.name for family in registry.collect()}
    documented = {name.removesuffix("_total")
                  for name in re.findall(r"`(dispatcher_[a-z_]+)`", README)
                  if name not in {"dispatcher_demo", "dispatcher_stopped"}}
    assert exposed - documented == set(), "metrics missing from the README"
    assert documented - exposed == set(), "README names metrics that do not exist"


def test_the_two_commands_are_the_makefile_targets_ci_runs() -> None:
    assert "`make demo`" in README
    assert "`make test`" in README
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.strip().splitlines()[-1] == "make test"


def test_every_phone_number_in_the_readme_is_one_libphonenumber_calls_valid() -> None:
    numbers = set(re.findall(r"\+\d{8,15}\b", README))
    assert numbers
    invalid = [n for n in sorted(numbers)
               if not phonenumbers.is_valid_number(phonenumbers.parse(n))]
    assert not invalid, f"examples a publisher would have refused: {invalid}"
