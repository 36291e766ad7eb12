PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA_DIR ?= ../shared/data

.PHONY: install test test-heavy lint demo bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples

test: lint
	$(PY) -m pytest -q

test-heavy: install
	$(PY) -m pytest -q -m 'montecarlo or slow'

# The README's demo table and plot come from this command (runs/demo/results.md, curves.png): every method on
# MNIST-1D (generated, no download), each at the rate a validation sweep chose; two worker processes of one
# torch thread each (extra threads only spin against each other on shared cores).
demo: install
	$(PY) examples/demo.py --out runs/demo --workers 2 --threads 1

# The speed/memory benchmark (each configuration in a fresh process; about an hour for the full grid).
bench: install
	$(VENV)/bin/fwdgrad bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
