"""A process killed (SIGKILL) in the middle of writing a checkpoint or final/ leaves the previous one usable."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from rlhf.engine.checkpoint import find_checkpoint, save_checkpoint
from tests.integration.conftest import REPO

# Engines and models whose save writes part of its files and then kills its own process, as an OOM kill or a
# preemption would in the middle of a write.
CHILD = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    from rlhf.engine.checkpoint import save_checkpoint, save_pretrained

    class Engine:
        def __init__(self, die):
            self.die = die
        def save_checkpoint(self, path, tag, save_latest):
            (Path(path) / tag).mkdir(parents=True, exist_ok=True)
            (Path(path) / tag / "weights.bin").write_bytes(b"new" * 1000)
            if self.die:
                os.kill(os.getpid(), signal.SIGKILL)

    class Model:
        def __init__(self, die):
            self.die = die
        def save_pretrained(self, path, state_dict=None):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "model.safetensors").write_bytes(b"second" if self.die else b"first")
            if self.die:
                os.kill(os.getpid(), signal.SIGKILL)

    root, what = Path(sys.argv[1]), sys.argv[2]
    if what == "checkpoint":
        save_checkpoint(root / "checkpoints", 1, {"policy": Engine(False)}, {"step": 1}, keep_last=3)
        save_checkpoint(root / "checkpoints", 2, {"policy": Engine(True)}, {"step": 2}, keep_last=3)
    else:
        save_pretrained(Model(False), None, root / "final")
        save_pretrained(Model(True), None, root / "final")
''')


def _run_child(tmp_path, what):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), what], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # killed by SIGKILL, mid-write


def test_a_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    _run_child(tmp_path, "checkpoint")
    root = tmp_path / "checkpoints"
    assert (root / ".tmp_step_00000002" / "policy" / "weights.bin").exists()  # the half-written one
    assert not (root / "step_00000002").exists()
    found = find_checkpoint(tmp_path, True)
    assert found == root / "step_00000001"
    assert json.loads((found / "trainer_state.json").read_text()) == {"step": 1}

    class Engine:
        def save_checkpoint(self, path, tag, save_latest):
            (Path(path) / tag).mkdir(parents=True)

    save_checkpoint(root, 2, {"policy": Engine()}, {"step": 2}, keep_last=3)  # the resumed run saves again
    assert not (root / ".tmp_step_00000002").exists() and find_checkpoint(tmp_path, True) == root / "step_00000002"


def test_a_kill_while_writing_final_keeps_the_previous_export(tmp_path):
    _run_child(tmp_path, "final")
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == b"first"
    assert (tmp_path / ".tmp_final" / "model.safetensors").read_bytes() == b"second"
