"""run.dir: a start that failed before its first checkpoint leaves nothing a rerun must refuse to replace."""

import pytest
from omegaconf import OmegaConf

from rlhf.errors import RLHFError
from rlhf.trainers.base import Trainer


def prepare(run_dir, **run):
    trainer = Trainer(OmegaConf.create({"run": {"dir": str(run_dir), "resume": False, "overwrite": False, **run}}))
    trainer._prepare_run_dir()
    return trainer


def test_a_failed_start_is_replaced(tmp_path, capsys):
    run_dir = tmp_path / "run"
    prepare(run_dir)  # the first try writes config.yaml, then (say) its reward function fails at step 1
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    (run_dir / "checkpoints" / ".tmp_step_00000050").mkdir(parents=True)  # killed in its first save
    prepare(run_dir, seed=1)
    assert "replacing them" in capsys.readouterr().out
    assert "seed: 1" in (run_dir / "config.yaml").read_text()
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("work", ["checkpoints/step_50/state.json", "final/config.json"])
def test_finished_work_is_refused_without_overwrite(tmp_path, work):
    prepare(tmp_path)
    (tmp_path / work).parent.mkdir(parents=True)
    (tmp_path / work).write_text("{}")
    with pytest.raises(RLHFError, match="already holds a run"):
        prepare(tmp_path)
    prepare(tmp_path, overwrite=True)
    assert not (tmp_path / work.split("/")[0]).exists()
