"""Dependencies: declared, locked, installed as locked, audited.

Every third-party module the code imports must be a declared dependency (the service's own in
pyproject's ``dependencies``; tests and benchmarks may also use the ``dev`` extra), never one that
merely arrives through another package. ``requirements/*.txt`` (``make lock``) must pin each
declared one within its range, with hashes; the venv must hold exactly the locked versions.
``scripts/audit-deps`` fails on known vulnerabilities and skips, saying why, when the advisory
database is unreachable.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OWN_PACKAGES = {"dispatcher", "billing_client", "tests", "bench"}
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
DEV_LOCK = ROOT / "requirements" / "dev.txt"
AUDIT = ROOT / "scripts" / "audit-deps"
# One locked requirement: the pin line, then its hash lines (continued with backslashes).
PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>[^\s;\\]+)(?P<marker>\s*;[^\\]*)?"
                 r"(?P<hashes>(?:\s*\\\s*--hash=sha256:[0-9a-f]{64})*)", re.MULTILINE)


RUNTIME_REQUIREMENTS = [Requirement(text) for text in PYPROJECT["dependencies"]]
DEV_REQUIREMENTS = [Requirement(text) for text in PYPROJECT["optional-dependencies"]["dev"]]
RUNTIME = {canonicalize_name(requirement.name) for requirement in RUNTIME_REQUIREMENTS}
DEV = {canonicalize_name(requirement.name) for requirement in DEV_REQUIREMENTS}


def _third_party_imports(*folders: str) -> dict[str, set[str]]:
    """Top-level modules imported anywhere (functions, TYPE_CHECKING too) -> the importing files."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OWN_PACKAGES:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _undeclared(folders: tuple[str, ...], allowed: set[str]) -> list[str]:
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(_third_party_imports(*folders).items()):
        providers = {canonicalize_name(name) for name in distributions.get(module, [])}
        if not providers & allowed:
            where = ", ".join(sorted(files)[:3])
            problems.append(f"{module} (from {sorted(providers) or 'no installed distribution'}"
                            f"; imported in {where})")
    return problems


def test_service_imports_only_declared_runtime_dependencies() -> None:
    problems = _undeclared(("dispatcher", "billing_client"), RUNTIME)
    assert not problems, ("imported by the service but not in pyproject's dependencies "
                          f"(add them, then `make lock`): {problems}")


def test_tests_and_benchmarks_import_only_declared_dependencies() -> None:
    problems = _undeclared(("tests", "bench"), RUNTIME | DEV)
    assert not problems, ("imported by tests/bench but not in pyproject's dependencies or dev "
                          f"extra (add them, then `make lock`): {problems}")


def _pins(lock: Path) -> dict[str, tuple[str, str, int]]:
    """Normalised name -> (version, marker, number of hashes)."""
    text = lock.read_text()
    pins = {canonicalize_name(m["name"]): (m["version"], (m["marker"] or "").strip(" ;"),
                                    m["hashes"].count("--hash=")) for m in PIN.finditer(text)}
    unparsed = [line for line in text.splitlines()
                if line and not line.startswith((" ", "#")) and "==" not in line]
    assert not unparsed, f"{lock.name}: lines that are not exact pins: {unparsed}"
    return pins


def test_locks_pin_every_declared_dependency_with_hashes() -> None:
    runtime, dev = _pins(RUNTIME_LOCK), _pins(DEV_LOCK)
    stale = "pyproject.toml changed since the lock: run `make lock`"
    assert not RUNTIME - runtime.keys(), f"{stale}; missing {sorted(RUNTIME - runtime.keys())}"
    missing = (RUNTIME | DEV) - dev.keys()
    assert not missing, f"{stale}; missing {sorted(missing)}"
    for lock, pins in ((RUNTIME_LOCK, runtime), (DEV_LOCK, dev)):
        assert "#    make lock" in lock.read_text(), f"{lock.name} is made by `make lock`"
        unhashed = [name for name, (_, _, hashes) in pins.items() if hashes == 0]
        assert not unhashed, f"{lock.name}: pins without hashes: {unhashed}"
    for lock, pins, requirements in ((RUNTIME_LOCK, runtime, RUNTIME_REQUIREMENTS),
                                     (DEV_LOCK, dev, RUNTIME_REQUIREMENTS + DEV_REQUIREMENTS)):
        locked = {str(requirement): pins[canonicalize_name(requirement.name)][0]
                  for requirement in requirements}
        outside = {text: version for text, version in locked.items()
                   if not Requirement(text).specifier.contains(version, prereleases=True)}
        assert not outside, f"{stale}; {lock.name} pins outside pyproject's ranges: {outside}"
    differ = {name: (pin[0], dev[name][0]) for name, pin in runtime.items()
              if name not in dev or dev[name][0] != pin[0]}
    assert not differ, f"runtime and dev locks disagree (runtime, dev): {differ}"
    # The service's platform marker survives locking (uvloop has no Windows build).
    assert runtime["uvloop"][1] == "sys_platform != 'win32'"
    # Linting and type checking are pinned too, so CI checks with the same versions every day.
    assert dev.keys() >= {"ruff", "mypy", "pip-audit", "uv", "pip", "setuptools"}


def test_venv_holds_the_locked_versions() -> None:
    wrong = {}
    for name, (version, marker, _) in _pins(DEV_LOCK).items():
        if marker and marker != "sys_platform != 'win32'":
            continue  # e.g. colorama on Windows only
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"locked vs installed (run `make setup`): {wrong}"


# --- scripts/audit-deps, against a stand-in pip-audit --------------------------------------------

FAKE_PIP_AUDIT = """\
import json, os, sys
args = sys.argv[1:]
assert "--require-hashes" in args and args[args.index("--requirement") + 1].endswith("dev.txt")
report = os.environ.get("FAKE_REPORT")
if report:
    with open(args[args.index("--output") + 1], "w") as out:
        out.write(report)
sys.stderr.write(os.environ.get("FAKE_STDERR", ""))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def _audit(tmp_path: Path, *, report: object = None, stderr: str = "",
           exit_code: int = 0) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "pip-audit"
    fake.write_text(f"#!{sys.executable}\n{FAKE_PIP_AUDIT}")
    fake.chmod(0o755)
    env = {**os.environ, "PIP_AUDIT": str(fake), "FAKE_STDERR": stderr,
           "FAKE_EXIT": str(exit_code), "FAKE_REPORT": json.dumps(report) if report else ""}
    return subprocess.run([sys.executable, str(AUDIT)], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


def test_audit_fails_on_a_known_vulnerability(tmp_path: Path) -> None:
    report = {"dependencies": [
        {"name": "urllib3", "version": "1.26.0",
         "vulns": [{"id": "GHSA-v845-jxx5-vc9f", "fix_versions": ["1.26.17"]}]},
        {"name": "yarl", "version": "1.25.1", "vulns": []}], "fixes": []}
    result = _audit(tmp_path, report=report, exit_code=1)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "urllib3==1.26.0: GHSA-v845-jxx5-vc9f (fixed in 1.26.17)" in result.stdout
    assert "FAILED: 1 known vulnerabilities in 1 locked packages" in result.stdout


def test_audit_passes_a_clean_lock(tmp_path: Path) -> None:
    report = {"dependencies": [{"name": "yarl", "version": "1.25.1", "vulns": []}], "fixes": []}
    result = _audit(tmp_path, report=report)
    assert result.returncode == 0
    assert result.stdout.strip() == "pip-audit: no known vulnerabilities in 1 locked packages"


@pytest.mark.parametrize(("report", "stderr", "exit_code"), [
    # Every lookup answered "not found" (a registry mirror without the per-release JSON API).
    ({"dependencies": [{"name": "yarl", "skip_reason": "Dependency not found on PyPI"}],
      "fixes": []}, "", 0),
    # No network at all: pip-audit dies with a traceback and writes no report.
    (None, "requests.exceptions.ConnectionError: HTTPSConnectionPool(host='api.osv.dev')", 1),
])
def test_audit_skips_with_one_line_when_the_database_is_unreachable(
        tmp_path: Path, report: object, stderr: str, exit_code: int) -> None:
    result = _audit(tmp_path, report=report, stderr=stderr, exit_code=exit_code)
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith("pip-audit: skipped (advisory database unreachable: ")


def test_audit_fails_when_pip_audit_breaks_otherwise(tmp_path: Path) -> None:
    result = _audit(tmp_path, stderr="ValueError: cannot parse requirement", exit_code=1)
    assert result.returncode == 1
    assert "pip-audit: FAILED: exit 1 without a report" in result.stdout
