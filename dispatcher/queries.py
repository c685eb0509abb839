"""Named SQL statements, parsed once from ``sql/queries.sql`` (``-- name: x`` headers)."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_HEADER = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


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
    folder = resources.files("dispatcher").joinpath("sql")
    merged: dict[str, str] = {}
    for path in sorted((p for p in folder.iterdir() if p.name.endswith(".sql")),
                       key=lambda p: p.name):
        for name, sql in parse(path.read_text(encoding="utf-8")).items():
            if name in merged:
                raise ValueError(f"duplicate query name {name!r} in {path.name}")
            merged[name] = sql
    return merged


def q(name: str) -> str:
    """The SQL text of the named statement."""
    return _all()[name]
