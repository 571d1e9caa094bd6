# Set-up and entry points. `make demo` and `make test` each create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# The demo installs only the package and its four dependencies (torch, numpy, rich, matplotlib).
$(VENV)/.installed-base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e .
	touch $@

demo: $(VENV)/.installed-base
	$(VENV)/bin/gradnoise profile

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench:
	$(MAKE) setup EXTRAS=dev,bench
	$(PY) benchmarks/engine_overhead.py --out benchmarks/results/engine_overhead.json
