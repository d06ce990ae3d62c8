# effdeploy: two commands on a fresh clone do everything:
#   make export quantize    (creates .venv, installs, runs the main job on the shipped default model)
#   make test
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast lint export quantize quantize-lite0 bench bench-lite0 bench-b0 train replicates reference-results profile compare clean

# torch is pinned in the same install: its CPU build lies on this machine's disk, while an
# unpinned torch (pulled in by a dependency) would fetch a multi-GB CUDA build.
# --no-compile: pip would byte-compile all 2.4 GB of packages up front (half the install time);
# Python compiles the modules a command imports on first use instead.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile torch==2.13.0 -e '.[dev,weights]'
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

# ---- reference models (CIFAR-10, EfficientNet-B0 depth, width 0.5, 32 px) -------------------
# `make train` trains whatever is missing (resuming an interrupted run from its last epoch), then
# distils the SE-before model from the SE-after one and measures every model on the test split.
# Reproduce from scratch without touching the committed checkpoints:  make train MODELS=runs/repro
MODELS ?= models
REF := cifar10_b0w05_after cifar10_b0w05_before cifar10_b0w05_none
TRAIN_THREADS ?=

$(MODELS)/%/model.safetensors: | $(STAMP)
	$(BIN)/effdeploy train --config configs/$*.yaml --out $(MODELS)/$* \
	  $(if $(wildcard $(MODELS)/$*/train_state.pt),--resume) $(if $(TRAIN_THREADS),--threads $(TRAIN_THREADS))

$(MODELS)/cifar10_b0w05_before_reorder/model.safetensors: $(MODELS)/cifar10_b0w05_after/model.safetensors
	$(BIN)/effdeploy reorder --checkpoint $< --to before --config configs/cifar10_b0w05_after.yaml \
	  --out $(MODELS)/cifar10_b0w05_before_reorder

train: $(foreach m,$(REF),$(MODELS)/$(m)/model.safetensors) $(MODELS)/cifar10_b0w05_before_reorder/model.safetensors
	$(MAKE) reference-results MODELS=$(MODELS)

# ---- replicates for the SE-placement study: seeds 1-2 per placement, a reordered twin of every
# SE-after seed, and depth coefficient 2 in both placements. Each run resumes from its last epoch.
STUDY := models/study
REPLICATES := cifar10_b0w05_after_s1 cifar10_b0w05_after_s1_reorder cifar10_b0w05_before_s1 \
  cifar10_b0w05_after_s2 cifar10_b0w05_after_s2_reorder cifar10_b0w05_before_s2 \
  cifar10_b0w05_none_s1 cifar10_b0w05_none_s2 cifar10_b0d2w05_after cifar10_b0d2w05_before

$(STUDY)/%_reorder/model.safetensors: $(STUDY)/%/model.safetensors
	$(BIN)/effdeploy reorder --checkpoint $< --to before --config configs/study/$*.yaml \
	  --out $(STUDY)/$*_reorder

$(STUDY)/%/model.safetensors: | $(STAMP)
	$(BIN)/effdeploy train --config configs/study/$*.yaml --out $(STUDY)/$* \
	  $(if $(wildcard $(STUDY)/$*/train_state.pt),--resume) $(if $(TRAIN_THREADS),--threads $(TRAIN_THREADS))

replicates: $(foreach m,$(REPLICATES),$(STUDY)/$(m)/model.safetensors)

reference-results: $(STAMP)
	$(BIN)/python benchmarks/reference_models.py --models-dir $(MODELS) --out benchmarks/results/reference_models

# `make export quantize`: the two are independent (each writes only its own files into artifacts/),
# and export is one process, so they run side by side: quantize's pool takes the second core.
ifneq ($(and $(filter export,$(MAKECMDGOALS)),$(filter quantize,$(MAKECMDGOALS))),)
MAKEFLAGS += -j2
endif

# ---- export: the default reference model to ONNX + TFLite, with the fidelity table ----------
EXPORT_CONFIGS ?= configs/cifar10_b0w05_after.yaml

export: $(STAMP)
	@for c in $(EXPORT_CONFIGS); do $(BIN)/effdeploy export --config $$c || exit 1; done

# ---- quantize: the SE-after and SE-before reference models, W8A8 and W4A8, shipped calibration set
QUANT_CONFIGS ?= configs/cifar10_b0w05_after.yaml configs/cifar10_b0w05_before.yaml
QUANT_ARGS ?=

quantize: $(STAMP)
	$(BIN)/effdeploy quantize $(foreach c,$(QUANT_CONFIGS),--config $(c)) $(QUANT_ARGS)

# ---- bench: every artifact of a model on this machine's CPU runtimes, plus the Edge TPU preflight.
# Exports and quantizes first where the artifacts are missing. Phones: BENCH_ARGS="--serial SERIAL
# --benchmark-model PATH". Results: bench.json / bench.md / bench.png beside the artifacts.
BENCH_CONFIGS ?= configs/cifar10_b0w05_after.yaml
BENCH_ARGS ?=

bench: $(STAMP)
	@for c in $(BENCH_CONFIGS); do n=$$(basename $$c .yaml); \
	  [ -f artifacts/$$n/model.onnx ] || $(BIN)/effdeploy export --config $$c || exit 1; \
	  [ -f artifacts/$$n/model_w8a8.onnx ] || $(BIN)/effdeploy quantize --config $$c || exit 1; \
	  $(BIN)/effdeploy bench --config $$c $(BENCH_ARGS) || exit 1; done

# int8 against float at 224 px (EfficientNet-Lite0, ImageNet weights), into benchmarks/results/bench/.
# Latency depends on the int8 graph, not on how its weights were rounded: AdaRound is off to keep
# this quick (its accuracy is what `make quantize-lite0` reports).
bench-lite0: $(MODELS)/imagenet_lite0/model.safetensors
	[ -f artifacts/imagenet_lite0/model.onnx ] || $(BIN)/effdeploy export --config configs/imagenet_lite0.yaml
	[ -f artifacts/imagenet_lite0/model_w8a8.onnx ] || $(BIN)/effdeploy quantize --config configs/imagenet_lite0.yaml \
	  --precisions w8a8 --adaround off
	$(BIN)/effdeploy bench --config configs/imagenet_lite0.yaml --images 100 --runs 100 --repeats 2 \
	  --out benchmarks/results/bench/imagenet_lite0 $(BENCH_ARGS)

# EfficientNet-B0 at 224 px, int8 against float: no trained B0 weights ship here, so random weights
# with BatchNorm statistics from the ImageNet samples (benchmarks/random_b0.py): latency and size only.
runs/imagenet_b0_random/model.safetensors: | $(STAMP)
	$(BIN)/python benchmarks/random_b0.py --out $@

bench-b0: runs/imagenet_b0_random/model.safetensors
	$(MAKE) bench BENCH_CONFIGS=configs/imagenet_b0_random.yaml \
	  BENCH_ARGS="--images 100 --runs 100 --repeats 2 --out benchmarks/results/bench/imagenet_b0_random $(BENCH_ARGS)"

# ---- EfficientNet-Lite0 with real ImageNet weights (imported from the registry package) -------
$(MODELS)/imagenet_lite0/model.safetensors: | $(STAMP)
	$(BIN)/effdeploy import-weights --pretrained lite0 --out $@

quantize-lite0: $(MODELS)/imagenet_lite0/model.safetensors
	$(BIN)/effdeploy quantize --config configs/imagenet_lite0.yaml

# ---- the SE-placement study: every model of configs/study/compare.yaml at every precision, cached
# per cell (a rerun quantizes only what changed or newly appeared), then compare.md / .json / PNGs
compare: $(STAMP)
	$(BIN)/effdeploy compare --config configs/study/compare.yaml

clean:
	rm -rf $(VENV) artifacts .pytest_cache
