import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A few steps of a shrunk tiny model: enough to exercise every path, seconds to run.
FAST = [
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
    "data.arithmetic.num_train=64", "data.arithmetic.num_eval=16",
    "trainer.micro_batch_size=8", "trainer.warmup_steps=1", "eval.max_new_tokens=8", "logger.progress=false",
]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, check: bool = True):
    """Run `rlhf ...` in a subprocess, as a user would."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1", **(env or {})}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in (env or {}):
            full_env.pop(var, None)
    proc = run_process([sys.executable, "-m", "rlhf.cli", *args], cwd=cwd or REPO, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"rlhf {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_process(cmd: list, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own, the whole session killed on timeout: a launcher's ranks (or a
    sandbox's children) would otherwise outlive it and take the machine's cores from every later test."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"{' '.join(map(str, cmd))} ran past {timeout:g} s\n{stdout[-4000:]}\n"
                                 f"{stderr[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture
def fast():
    return list(FAST)
