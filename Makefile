# Two commands work on a fresh machine with Python >= 3.10 and the package index:
#   make run    create .venv, install scanfit, train the seed problem on built-in data
#   make test   create .venv if needed, install the dev and examples extras, run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test test-all bench bench-quick lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Stamp files: reinstall only when the package metadata changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install -e ".[dev,examples]"
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/scanfit train

# CI: the slow tests (exhaustive fault sweeps) are left to `make test-all`.
test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)/.installed-dev
	$(PY) -m pytest -q

$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(PIP) install -e ".[bench]"
	touch $@ $(VENV)/.installed

bench: $(VENV)/.installed-bench
	$(PY) benchmarks/run.py

bench-quick: $(VENV)/.installed-bench
	$(PY) benchmarks/run.py --quick

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
