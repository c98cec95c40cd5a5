"""Numeric guards on a real DeepSpeed engine: a non-finite loss leaves every weight unchanged, is counted, and
too many in a row stop the run with the step named. Run in a subprocess: it needs its own process group."""

import os
import subprocess
import sys
import textwrap

import pytest

from rlhf.engine.guard import StepGuard
from rlhf.errors import RLHFError

SCRIPT = textwrap.dedent("""
    import torch
    from rlhf.config import load_config
    from rlhf.engine import distributed as dist
    from rlhf.engine.engine import backward, build_engine, guard_of, optimizer_step
    from rlhf.errors import RLHFError
    from rlhf.models.tiny import build_tiny_model
    from rlhf.models.tokenizer import build_char_tokenizer

    dist.init_distributed()
    try:
        cfg = load_config("sft", ["model.tiny.hidden_size=16", "model.tiny.num_layers=1",
                                  "model.tiny.intermediate_size=32", "trainer.micro_batch_size=2",
                                  "trainer.grad_accum=2", "trainer.warmup_steps=0", "trainer.lr_scheduler=constant",
                                  "guard.max_bad_steps=1"])
        torch.manual_seed(0)
        engine = build_engine(build_tiny_model(cfg.model.tiny, build_char_tokenizer(), seed=0), cfg, world_size=1)
        # on CPU the optimizer DeepSpeed builds is torch's fused AdamW (rlhf.engine.engine.deepspeed_config)
        assert type(engine.optimizer) is torch.optim.AdamW and engine.optimizer.param_groups[0]["fused"] is True
        ids = torch.randint(3, 20, (2, 6))
        weights = lambda: [p.detach().clone() for p in engine.module.parameters()]

        def step(poison):
            for micro in range(2):
                loss = engine(input_ids=ids).logits.float().mean()
                if micro == poison:
                    loss = loss * float("nan")
                backward(engine, loss)
                optimizer_step(engine)
            return guard_of(engine).end_step(1)

        before = weights()
        assert step(poison=1) == {"guard/skipped": 1.0, "guard/skipped_total": 1.0}
        assert all(torch.equal(a, b) for a, b in zip(before, weights())), "a skipped step changed weights"
        assert all(torch.isfinite(p).all() for p in engine.module.parameters())
        assert engine.optimizer.param_groups[0]["lr"] > 0, "the learning rate stays as scheduled"
        assert step(poison=None) == {}
        assert not all(torch.equal(a, b) for a, b in zip(before, weights())), "a good step must train"
        step(poison=0)
        try:
            step(poison=0)
        except RLHFError as e:
            assert "non-finite loss" in str(e) and "2 steps in a row" in str(e), e
        else:
            raise AssertionError("two bad steps in a row with max_bad_steps=1 must stop the run")
        print("ok")
    finally:
        dist.shutdown()
""")


def test_non_finite_loss_skips_the_update_and_stops_after_max_bad_steps():
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_guard_counts_and_resets():
    guard = StepGuard(max_bad_steps=0)
    assert guard.end_step(1) == {}
    guard.gradient_norm(float("inf"))
    assert guard.skip
    with pytest.raises(RLHFError, match="step 2: non-finite gradient norm"):
        guard.end_step(2)


def test_guard_of_answers_for_the_engines_given_one_only():
    from rlhf.engine import engine as engines

    class Engine:  # stands in for a DeepSpeed engine
        pass

    ours, other = Engine(), Engine()
    engines._GUARDS[ours] = StepGuard(3, 0)
    assert engines.guard_of(ours) is engines._GUARDS[ours]
    assert engines.guard_of(other) is None and engines.guard_of(None) is None and engines.guard_of(1) is None


ROUND_TRIP = textwrap.dedent("""
    import sys
    from pathlib import Path
    from types import SimpleNamespace
    import torch
    from rlhf.config import load_config
    from rlhf.engine import distributed as dist
    from rlhf.engine.engine import backward, build_engine, guard_of, optimizer_step
    from rlhf.models.tiny import build_tiny_model
    from rlhf.models.tokenizer import build_char_tokenizer
    from rlhf.trainers.base import Trainer

    dist.init_distributed()
    try:
        cfg = load_config("sft", ["model.tiny.hidden_size=16", "model.tiny.num_layers=1",
                                  "model.tiny.intermediate_size=32", "trainer.micro_batch_size=2",
                                  "guard.max_bad_steps=3"])

        def trainer():  # what Trainer._save and _resume read
            engine = build_engine(build_tiny_model(cfg.model.tiny, build_char_tokenizer(), seed=0), cfg, world_size=1)
            return SimpleNamespace(engines={"policy": engine}, step=0, samples_seen=0, world=1, stage="sft", cfg=cfg,
                                   run_dir=Path(sys.argv[1]), zero_stage=lambda: 0, extra_state=lambda: {},
                                   load_extra_state=lambda state: None)

        before = trainer()
        engine = before.engines["policy"]
        for poisoned in (True, True, False):
            loss = engine(input_ids=torch.randint(3, 20, (2, 6))).logits.float().mean()
            backward(engine, loss * float("nan") if poisoned else loss)
            optimizer_step(engine)
            guard_of(engine).end_step(1)
        assert guard_of(engine).total == 2 and guard_of(engine).consecutive == 0
        before.step = 3
        Trainer._save(before)
        after = trainer()
        assert guard_of(after.engines["policy"]).total == 0
        Trainer._resume(after, Path(sys.argv[1]) / "checkpoints" / "step_00000003")
        assert after.step == 3 and guard_of(after.engines["policy"]).total == 2
        print("ok")
    finally:
        dist.shutdown()
""")


def test_the_count_of_skipped_steps_survives_a_checkpoint_and_resume(tmp_path):
    """guard/skipped_total goes on counting after a resume: it is saved with the trainer state and read back."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
