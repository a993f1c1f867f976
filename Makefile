# dp_sweeps: `make run` and `make test` do all the set-up on a fresh machine. `make help` lists the targets.
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
# make paper JOBS=N: N runs at once on this machine's device (hydra/launcher=local, docs/cluster.md).
JOBS ?= 1
PAPER_LAUNCHER := $(if $(filter-out 1,$(JOBS)),hydra/launcher=local hydra.sweeper.max_batch_size=$(JOBS))

PAPER_EXPERIMENTS := epsilon batch clip lr epochs optimizer classical
# The paper's open questions that it left unmeasured: run on request, not by `make paper`.
OPEN_QUESTIONS := mechanism

.PHONY: help install run test test-all lint bench gpu-check report audit clean paper paper-table \
	$(addprefix paper-,$(PAPER_EXPERIMENTS) $(OPEN_QUESTIONS))

## This list: every target and what it does (the first `## ` line above its rule).
help:
	@awk '/^## / { if (!doc) doc = substr($$0, 4); next } \
	     /^[^#[:space:]][^=]*:/ && doc { target = $$0; sub(/:.*/, "", target); \
	         if (target ~ /addprefix paper-/) target = "paper-<experiment>"; printf "  %-19s %s\n", target, doc } \
	     { doc = "" }' $(MAKEFILE_LIST)

## Create .venv with the package, every extra and the dev tools (redone when pyproject.toml changes).
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

## The default job: one DP training run (the paper's best setting) composed from conf/.
run: install
	$(PY) -m dp_sweeps $(ARGS)

## The fast test suite: all but the tests marked slow (CPU only, tiny data made by the tests).
test: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS) $(ARGS)

## The whole test suite, slow end-to-end tests included (what CI runs).
test-all: install
	$(PY) -m pytest $(PYTEST_ARGS) $(ARGS)

## Ruff's checks of src/ and tests/ (the rules in pyproject.toml).
lint: install
	$(PY) -m ruff check src tests $(ARGS)

## Samples/s and peak memory per model and per-example gradient engine (outputs/bench/).
bench: install
	$(PY) -m dp_sweeps.bench $(ARGS)

## The first GPU hour: benchmark, bf16, one real epoch, cost estimates (outputs/gpu-check/; ARGS=--smoke: CPU, < 2 min).
gpu-check: install
	$(PY) -m dp_sweeps.gpu_check $(ARGS)

## Empirical privacy audit: ε lower bounds beside the claimed ε, and a broken-mechanism control.
audit: install
	$(PY) -m dp_sweeps.privacy.audit $(ARGS)

## Gather runs and sweeps under outputs/ into tables and plots.
report: install
	$(PY) -m dp_sweeps.analysis.report $(OUTPUT_DIR)/runs $(OUTPUT_DIR)/multiruns --out $(OUTPUT_DIR)/report $(ARGS)

## One paper experiment, conf/experiment/paper_<experiment>.yaml (epsilon, batch, clip, lr, epochs, optimizer, classical; mechanism: Gaussian vs Laplace), at SCALE=smoke or full.
## Runs land in outputs/paper/<scale>/<experiment>/; finished runs are not repeated. JOBS=N runs N at once.
## Exits non-zero when every run of the experiment failed (the first error is printed).
$(addprefix paper-,$(PAPER_EXPERIMENTS) $(OPEN_QUESTIONS)): paper-%: install
	$(PY) -m dp_sweeps experiment=paper_$* scale=$(SCALE) paths.output_dir=$(OUTPUT_DIR) $(PAPER_LAUNCHER) $(ARGS) -m

## All of the paper's experiments (every paper-<experiment> above but the open question `mechanism`), at SCALE=smoke or full; JOBS=N runs N at once.
paper: $(addprefix paper-,$(PAPER_EXPERIMENTS))

## The paper's tables and plots from whatever has been run, into outputs/paper/<scale>/.
paper-table: install
	$(PY) -m dp_sweeps.analysis.paper $(OUTPUT_DIR)/paper/$(SCALE) $(ARGS)

## Remove outputs/ and pytest's cache.
clean:
	rm -rf outputs/ .pytest_cache
