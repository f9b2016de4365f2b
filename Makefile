# All targets create and use .venv in the repo root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: install test test-slow demo bench bench-loading bench-focusnet bench-cowam clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from this disk only when no torch is present (users with GPUs keep theirs).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q -c constraints-cpu.txt torch
	$(BIN)/pip install -q -c constraints-cpu.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/pytest -m slow -q

demo: $(STAMP)
	$(BIN)/python -m organseg.demo

bench: bench-loading

bench-loading: $(STAMP)
	$(BIN)/python benchmarks/patch_loading.py

# FocusNetV2 vs baselines at one fixed budget per method (~46 min on 2 CPU cores at 12 min/method, the least at which
# SOL gets ~100 steps (110 measured); MINUTES=2 for a quick look at the plumbing)
bench-focusnet: $(STAMP)
	$(BIN)/python benchmarks/focusnet_phantom.py --minutes $(or $(MINUTES),12) $(BENCH_ARGS)

# co-training WAM vs its 4 baselines at one fixed budget of optimiser steps per network (about 10 min on 2
# quiet CPU cores at STEPS=150, 25 min at STEPS=500; STEPS=10 for a quick look)
bench-cowam: $(STAMP)
	$(BIN)/python benchmarks/cowam_phantom.py --steps $(or $(STEPS),150) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data/demo lightning_logs/demo*
