# `make demo` and `make test` set up everything they need on a fresh clone (Python 3.10+).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed

export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install demo test test-fast bench docs clean

install: $(STAMP)

# torch goes in first and only when absent: a bare `torch` requirement would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The whole recipe on the embedded default: sft -> train-rm -> ppo -> grpo and an equal-time SFT control, then
# outputs/demo/report.md (report.html, summary.json, plots/). Finished stages are kept: a second `make demo`
# only redoes the report (DEMO_ARGS='pipeline.force=[all]' runs everything again).
demo: install
	$(VENV)/bin/rlhf pipeline run.dir=outputs/demo $(DEMO_ARGS)

# One test worker per core (at most 4), each test file on one worker so its shared checkpoints are made once; every
# worker and the runs it starts use one torch thread (tests/conftest.py).
PYTEST := $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

test: install
	$(PYTEST) -ra

test-fast: install
	$(PYTEST) -m "not slow"

# Throughput, phase times, peak RSS and MFU of every stage on one workload, side by side with TRL when it is installed
# (pip install -e '.[bench]'); BENCH_ARGS='--steps 10 --dtype bf16' changes the workload (docs/performance.md).
bench: install
	$(PY) scripts/bench.py $(BENCH_ARGS)

docs: install
	$(PY) -m rlhf.docs > docs/configuration.md

clean:
	rm -rf outputs build dist *.egg-info
