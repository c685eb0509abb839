"""Named SQL statements, parsed once from ``queries.sql`` (``-- name: x`` headers)."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_HEADER = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_PACKAGE = "billing_client.reference"


def parse(text: str) -> dict[str, str]:
    """Split a file of ``-- name: x`` sections into {name: statement}."""
    parts = _HEADER.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"duplicate query name {name!r}")
        queries[name] = body.strip().rstrip(";")
    return queries


@cache
def _all() -> dict[str, str]:
    return parse(resources.files(_PACKAGE).joinpath("queries.sql").read_text(encoding="utf-8"))


def q(name: str) -> str:
    """The SQL text of the named statement."""
    return _all()[name]


@cache
def schema() -> str:
    """The idempotent DDL of the ``billing_ref`` schema."""
    return resources.files(_PACKAGE).joinpath("schema.sql").read_text(encoding="utf-8")
