"""A run in one process has no peer to share memory with: it must not JIT-build DeepSpeed's CPU shared-memory
collective (30-90 s in a fresh environment, and a lock that hangs later runs if the build is killed)."""

import os
import subprocess
import sys

SETUP = """
import torch
from rlhf.config import load_config
from rlhf.engine import distributed as dist
from rlhf.engine.engine import build_engine

dist.init_distributed()
cfg = load_config("sft", ["trainer.max_steps=2"])
engine = build_engine(torch.nn.Linear(4, 1), cfg, dist.world_size())
loss = engine(torch.ones(2, 4)).sum()
engine.backward(loss)
engine.step()
dist.shutdown()
print("engine stepped")
"""


def test_a_single_process_run_builds_no_shared_memory_op(tmp_path):
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TORCH_EXTENSIONS_DIR=str(extensions), DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, "-c", SETUP], env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "engine stepped" in output
    assert list(extensions.iterdir()) == []
    assert "shm_comm" not in output
    assert "Loading extension module" not in output
