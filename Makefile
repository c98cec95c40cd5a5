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

# The cold start, then R1's RL stage on many verifier-judged prompts, starting from the SFT checkpoint.
demo: install
	$(VENV)/bin/rlhf sft run.overwrite=true run.dir=outputs/demo/sft
	$(VENV)/bin/rlhf grpo run.overwrite=true run.dir=outputs/demo/grpo model.name_or_path=outputs/demo/sft/final
	@$(PY) scripts/summarize.py outputs/demo/sft outputs/demo/grpo

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow"

docs: install
	$(PY) -m rlhf.docs > docs/configuration.md

clean:
	rm -rf outputs build dist *.egg-info
