# dp_sweeps: `make run` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The stamp changes with pyproject.toml, so a second install costs nothing.
STAMP := $(VENV)/.installed
ARGS ?=
SCALE ?= smoke
# Where runs, sweeps and the paper's tables go (the configs' paths.output_dir).
OUTPUT_DIR ?= $(or $(DP_SWEEPS_OUTPUT_DIR),outputs)
PYTEST_ARGS ?= -n 2

PAPER_EXPERIMENTS := epsilon batch clip lr epochs optimizer classical

.PHONY: install run test bench report audit clean paper paper-table $(addprefix paper-,$(PAPER_EXPERIMENTS))

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

## Samples/s and peak memory per model and per-example gradient engine (outputs/bench/).
bench: install
	$(PY) -m dp_sweeps.bench $(ARGS)

## Empirical privacy audit: ε lower bounds beside the claimed ε, and a broken-mechanism control.
audit: install
	$(PY) -m dp_sweeps.privacy.audit $(ARGS)

## Gather runs and sweeps under outputs/ into tables and plots.
report: install
	$(PY) -m dp_sweeps.analysis.report $(OUTPUT_DIR)/runs $(OUTPUT_DIR)/multiruns --out $(OUTPUT_DIR)/report

## The paper's experiments (conf/experiment/paper_*.yaml), at SCALE=smoke or full.
## Runs land in outputs/paper/<scale>/<experiment>/; finished runs are not repeated.
$(addprefix paper-,$(PAPER_EXPERIMENTS)): paper-%: install
	$(PY) -m dp_sweeps experiment=paper_$* scale=$(SCALE) paths.output_dir=$(OUTPUT_DIR) $(ARGS) -m

paper: $(addprefix paper-,$(PAPER_EXPERIMENTS))

## The paper's tables and plots from whatever has been run, into outputs/paper/<scale>/.
paper-table: install
	$(PY) -m dp_sweeps.analysis.paper $(OUTPUT_DIR)/paper/$(SCALE)

clean:
	rm -rf outputs/ .pytest_cache
