# All targets create and use .venv in the repo root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: install lint test test-slow test-all demo bench bench-loading bench-focusnet bench-cowam bench-threads bench-steps bench-loader-peers clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from this disk only when no torch is present (users with GPUs keep theirs).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q -c constraints-cpu.txt torch
	$(BIN)/pip install -q -c constraints-cpu.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# ruff lint + format check (pyproject [tool.ruff]) and the layer contracts (pyproject [tool.importlinter]); part of `make test`
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

# lint + every test not marked `slow`: the everyday run (its pytest part ~2 min on 2 CPU cores)
test: lint
	$(BIN)/pytest -m "not slow" -q

# the long integration runs marked `slow` (~14 min on 2 CPU cores): the real SLURM cluster, DDP, `organseg`
# subprocess fits and config checks (the demo's runs, CLI errors), a 2-stage FocusNetV2 chain, a 2-trial sweep
test-slow: $(STAMP)
	$(BIN)/pytest -m slow -q

# both: every test (what CI runs, .ci/run)
test-all: test test-slow

demo: $(STAMP)
	$(BIN)/python -m organseg.cli.demo

bench: bench-loading

bench-loading: $(STAMP)
	$(BIN)/python benchmarks/patch_loading.py

# FocusNetV2 vs its parts and the U-Net at equal optimiser steps, 3 seeds, paired intervals (organseg bench; quick
# size by default, FULL=1 for the full size on a GPU); resumable: run it again after an interruption
bench-focusnet: $(STAMP)
	$(BIN)/organseg bench benchmarks/focusnet_phantom.yaml $(if $(FULL),,--quick) $(BENCH_ARGS)

# co-training WAM vs its baselines (multi-model, compute-matched multi-model, naive union, marginal, self-training)
# at fixed optimiser steps per network, 3 seeds, paired intervals (organseg bench; quick size by default, FULL=1 for
# the full size on a GPU); resumable: run it again after an interruption
bench-cowam: $(STAMP)
	$(BIN)/organseg bench benchmarks/cowam_phantom.yaml $(if $(FULL),,--quick) $(BENCH_ARGS)

# training steps/s idle and beside 2 busy-loop processes, old vs new thread settings, fixed optimiser steps per
# fit (issue 11: falls by no more than the CPU share lost; ~4 min on 2 quiet CPU cores, ~11 on busy ones; WINDOW=2 quick)
bench-threads: $(STAMP)
	$(BIN)/python benchmarks/threads_under_load.py --window $(or $(WINDOW),8) $(BENCH_ARGS)

# training-loader patches/s, organseg vs nnU-Net v2 (its own throwaway venv under ~/.cache/organseg-bench, installed
# on first use; skipped with one line where pip cannot), batch 2, 2 workers each, patches 64x64x32 to 192x192x48,
# 3 interleaved rounds (issue 11; ~15 min on 2 busy CPU cores plus the first install; SECONDS_PER=3 REPEATS=1 quick)
bench-loader-peers: $(STAMP)
	$(BIN)/python benchmarks/loader_peers.py --seconds $(or $(SECONDS_PER),10) --repeats $(or $(REPEATS),3) $(BENCH_ARGS)

# training steps/s (batch 2 x 96x96x32, 2 threads, random data) of the U-Net with 3x3x3 vs spacing-derived kernels
# and S-Net with upstream vs in-plane full-resolution kernels, interleaved rounds (issue 11; ~5-10 min on 2 CPU
# cores; STEPS=1 REPEATS=1 for a quick look)
bench-steps: $(STAMP)
	$(BIN)/python benchmarks/step_speed.py --steps $(or $(STEPS),4) --repeats $(or $(REPEATS),3) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data/demo lightning_logs/demo*
