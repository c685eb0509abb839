"""The package layout is the architecture: imports run only downward through the layers.

Every ``import`` in ``dispatcher/`` and ``billing_client/`` is read with ``ast`` (deferred
imports inside functions included), so a shortcut from a lower layer to a higher one fails here.
The order is drawn in the README's architecture section.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. Units in one layer are peers: they never import each other.
LAYERS: list[set[str]] = [
    {"errors", "settings", "logs", "queries", "metrics", "migrate"},
    {"db", "tokens", "loops"},
    {"pricing"},
    {"credits"},
    {"jobs"},
    {"events", "twilio", "broadcasts"},
    {"dispatch"},
    {"api"},
    {"http"},
    {"service"},
    {"demo", "sandbox"},
    {"cli"},
    {"__main__"},
]
LAYER_OF = {unit: index for index, layer in enumerate(LAYERS) for unit in layer}
TOOLS = {"demo", "sandbox"}


def _unit(module: str) -> str:
    """``dispatcher.credits.ledger`` -> ``credits``; ``dispatcher.http`` -> ``http``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    return _imports_of(path.read_text(), package)


def _imports_of(source: str, package: str) -> set[str]:
    """Absolute names of every module ``source`` (in ``package``) imports from our packages."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in {"dispatcher", "billing_client"}}


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _edges() -> list[tuple[str, str, str]]:
    """(file, importing unit, imported unit) for every import between units of dispatcher."""
    edges = []
    for path in _sources("dispatcher"):
        source = _unit(_module_name(path))
        for name in _imports(path):
            target = _unit(name)
            if name.startswith("dispatcher.") and target in LAYER_OF and target != source:
                edges.append((str(path.relative_to(ROOT)), source, target))
    return edges


def test_every_unit_of_the_package_has_a_layer() -> None:
    units = {_unit(_module_name(path)) for path in _sources("dispatcher")} - {""}
    assert units - set(LAYER_OF) == set(), "add new modules and sub-packages to LAYERS"
    assert set(LAYER_OF) - units == set(), "LAYERS names a unit that no longer exists"


def test_imports_run_only_downward() -> None:
    upward = [
        f"{path}: {source} (layer {LAYER_OF[source]}) imports {target} (layer {LAYER_OF[target]})"
        for path, source, target in _edges()
        if LAYER_OF[target] >= LAYER_OF[source]
    ]
    assert upward == []


def test_the_service_never_imports_the_demo_or_the_sandbox() -> None:
    """Only the command line reaches the tools; nothing the service runs depends on them."""
    offenders = [
        (path, source, target)
        for path, source, target in _edges()
        if target in TOOLS and source not in TOOLS and source not in {"cli", "__main__"}
    ]
    assert offenders == []


@pytest.mark.parametrize("unit", ["pricing", "credits"])
def test_money_rules_import_no_io_layer(unit: str) -> None:
    """Pricing and credits stand alone: no queue, provider, broadcast, API or tool code."""
    forbidden = {"jobs", "dispatch", "twilio", "events", "broadcasts", "api", "demo", "sandbox"}
    reached = [(path, target) for path, source, target in _edges() if source == unit]
    assert [(path, target) for path, target in reached if target in forbidden] == []


def test_billing_client_never_imports_the_dispatcher() -> None:
    offenders = [
        (str(path.relative_to(ROOT)), name)
        for path in _sources("billing_client")
        for name in _imports(path)
        if name.split(".")[0] == "dispatcher"
    ]
    assert offenders == []


def test_the_checker_sees_deferred_and_relative_imports() -> None:
    """Otherwise the tests above could pass while proving nothing."""
    source = "def f():\n    from dispatcher.dispatch import handler\n    from ..jobs import store\n"
    found = _imports_of(source, "dispatcher.pricing")
    assert {"dispatcher.dispatch.handler", "dispatcher.jobs.store"} <= found
    assert "dispatcher.pricing.numbers" in _imports(ROOT / "dispatcher" / "pricing" / "quotes.py")
