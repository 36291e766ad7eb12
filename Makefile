PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA_DIR ?= ../shared/data

.PHONY: install test test-heavy lint demo bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples

test: lint
	$(PY) -m pytest -q

test-heavy: install
	$(PY) -m pytest -q -m 'montecarlo or slow'

demo: install
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
