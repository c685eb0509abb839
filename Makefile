# The two commands of the README: `make demo` and `make test`. Both set themselves up, from the
# lock files (requirements/*.txt, exact versions with hashes); `make lock` refreshes those.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint audit lock demo bench clean

# The lock pins pip and the build backend too: the editable install builds with the locked
# setuptools (--no-build-isolation), so nothing unpinned is installed.
$(VENV)/.installed: pyproject.toml requirements/dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check dispatcher billing_client tests bench
	$(VENV)/bin/mypy

# Known vulnerabilities in the locked versions fail; an unreachable advisory database skips.
audit: setup
	$(PY) scripts/audit-deps

test: setup
	bash scripts/system-deps
	$(PY) -m dispatcher.demo.services
	$(MAKE) lint
	$(MAKE) audit
	bash scripts/run-tests

# Re-resolve requirements/*.txt from pyproject.toml (UPGRADE=1: newest allowed versions).
# Needs only uv (the locked version, installed into the venv if missing), not a working setup.
lock:
	test -x $(VENV)/bin/uv || { python3 -m venv $(VENV) && $(PY) -m pip install -q \
	    "$$(grep -m1 -o '^uv==[^ ]*' requirements/dev.txt || echo uv)"; }
	UV=$(VENV)/bin/uv bash scripts/lock

demo: setup
	$(PY) -m dispatcher.demo.services
	$(PY) -m dispatcher demo

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
