# The two commands: `make demo` and `make test`. Both run `setup` first; setup is idempotent.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_PACKAGES := ffmpeg slurm-wlm munge
# CPU defaults: DeepSpeed on the CPU accelerator, one BLAS thread per process (2 cores), never download.
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-deps demo demo-slurm test test-fast test-slow lint format bench ablation clean

setup: system-deps $(STAMP)

system-deps:
	@if command -v ffmpeg >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing $(SYSTEM_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else \
		echo "missing system packages; run: sudo apt-get update && sudo apt-get install -y $(SYSTEM_PACKAGES)"; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev,face]'
	$(PY) -c 'from emi.engine.distributed import build_deepspeed_cpu_ops; build_deepspeed_cpu_ops()'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/python -m emi.demo

demo-slurm: setup
	bash slurm/local/demo.sh

# Everything but the slow checks (`make test-slow`: the learning checks, about 10 minutes each, and the
# trainer benchmark's and the GPU scripts' CPU runs, a minute each).
test: setup
	$(PY) -m pytest -q -m 'not slow' --durations=15

test-fast: setup
	$(PY) -m pytest -q -m 'not slow and not slurm'

test-slow: setup
	$(PY) -m pytest -q -m slow

# Style (ruff: lint and format) and the layers' import contracts (import-linter, pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) -m benchmarks.run

# The learning numbers and the ablation tables of benchmarks/RESULTS.md: the data sets, then one
# `emi sweep --config configs/sweeps/ablation.yaml --local` (about 1.5 hours on 2 cores; a re-run continues).
ablation: setup
	$(PY) -m benchmarks.ablation

# Everything `make demo` (and demo-slurm) wrote; the venv stays.
clean:
	rm -rf runs logs/* data/synth data/features
	find data/shards -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
