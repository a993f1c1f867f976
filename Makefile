# dp_sweeps: `make run` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The stamp changes with pyproject.toml, so a second install costs nothing.
STAMP := $(VENV)/.installed
ARGS ?=
SCALE ?= smoke
PYTEST_ARGS ?= -n 2

.PHONY: install run test bench report audit clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## The default job: one DP training run (the paper's best setting) composed from conf/.
run: install
	$(PY) -m dp_sweeps $(ARGS)

## The test suite (CPU only, tiny data made by the tests).
test: install
	$(PY) -m pytest $(PYTEST_ARGS) $(ARGS)

## Gather runs and sweeps under outputs/ into tables and plots.
report: install
	$(PY) -m dp_sweeps.report outputs/runs outputs/multiruns --out outputs/report

clean:
	rm -rf outputs/ .pytest_cache
