"""Test-wide environment: CPU DeepSpeed, offline hub and wandb, quiet tokenizers."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per test worker (and per process it starts): `make test` runs a worker per core, and two
    # workers of two threads each on two cores spend their time waiting on each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed's JIT-built ops (the CPU shared-memory collective) go in this clone, not in the user's cache: a fresh
# clone builds its own instead of waiting on a lock some earlier killed build left in ~/.cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                                           ".cache", "torch_extensions"))
