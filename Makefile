# The two commands of the README: `make demo` and `make test`. Both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint demo bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check dispatcher billing_client tests bench
	$(VENV)/bin/mypy

test: setup
	bash scripts/system-deps
	$(PY) -m dispatcher.demo.services
	$(MAKE) lint
	$(VENV)/bin/pytest -q

demo: setup
	$(PY) -m dispatcher.demo.services
	$(PY) -m dispatcher demo

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
