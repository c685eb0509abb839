"""Every command's ``--help`` says what it needs: the variables, services and ports."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from dispatcher.cli import build_parser
from tests.acceptance.process import ROOT


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
           ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable subcommand of ``parser`` with its words."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from leaves(child, (*path, name))


COMMANDS = dict(leaves(build_parser()))


def test_the_commands_are_all_found() -> None:
    assert {"run", "migrate", "accounts create", "tokens create", "demo"} <= {
        " ".join(path) for path in COMMANDS}


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_dispatcher_command_names_what_it_needs(path: tuple[str, ...]) -> None:
    text = COMMANDS[path].format_help()
    if path == ("demo",):
        assert "127.0.0.1:5432" in text and "127.0.0.1:5672" in text
        assert "DISPATCHER_TWILIO_ACCOUNT_SID" in text
        return
    assert "DISPATCHER_DATABASE_URL" in text and "dispatcher migrate" in text
    if path == ("run",):
        for needed in ("DISPATCHER_AMQP_URL", "DISPATCHER_AMQP_PREFIX", "DISPATCHER_HTTP_PORT",
                       "8080", "DISPATCHER_TWILIO_AUTH_TOKEN", "DISPATCHER_TWILIO_BASE_URL",
                       "/metrics"):
            assert needed in text, needed


def help_of(*module: str) -> str:
    result = subprocess.run([sys.executable, "-m", *module, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


def test_sandbox_help_names_its_port_and_credentials() -> None:
    text = help_of("dispatcher.sandbox")
    for needed in ("8765", "DISPATCHER_TWILIO_ACCOUNT_SID", "DISPATCHER_TWILIO_AUTH_TOKEN",
                   "DISPATCHER_TWILIO_BASE_URL"):
        assert needed in text, needed


@pytest.mark.parametrize("command", [(), ("run",), ("methods", "set"), ("invoices",)])
def test_billing_reference_help_names_what_it_needs(command: tuple[str, ...]) -> None:
    text = help_of("billing_client.reference", *command)
    for needed in ("BILLING_DATABASE_URL", "BILLING_AMQP_URL", "BILLING_AMQP_PREFIX"):
        assert needed in text, needed
