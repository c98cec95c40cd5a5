import pytest

from rlhf.config import load_config
from rlhf.engine.engine import deep_merge, deepspeed_config, lr_factor
from rlhf.errors import ConfigError


def test_deepspeed_config_derived_from_run():
    cfg = load_config("sft", ["trainer.micro_batch_size=4", "trainer.grad_accum=3", "trainer.lr=2e-4",
                              "deepspeed=zero2", "+deepspeed.overrides.zero_optimization.reduce_bucket_size=1000"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["optimizer"]["params"]["lr"] == 2e-4
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["params"]["torch_adam"] is True  # on CPU: torch's AdamW, no JIT-built op to wait on
    assert ds["optimizer"]["params"]["fused"] is True  # its one-kernel step, not a loop over tensors


def test_zero_accumulation_refused_with_the_keys_to_change():
    with pytest.raises(ConfigError, match="trainer.grad_accum"):
        load_config("sft", ["trainer.grad_accum=0"])
    cfg = load_config("sft", [])
    cfg.trainer.grad_accum = 0
    with pytest.raises(ConfigError, match="trainer.grad_accum"):
        deepspeed_config(cfg, world_size=1)


def test_deep_merge_keeps_siblings():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}


def test_lr_schedule_shapes():
    assert lr_factor(0, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(99, 0, 100, "constant", 0.1) == 1.0
    with pytest.raises(ConfigError, match="lr_scheduler"):
        lr_factor(50, 10, 100, "exp", 0.1)


def test_stale_build_locks_are_found_and_fresh_ones_left_alone(tmp_path, monkeypatch):
    import os
    import time

    from rlhf.engine.distributed import stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for op, age in (("fused_adam", 3600), ("deepspeed_shm_comm", 10)):
        (tmp_path / op).mkdir()
        (tmp_path / op / "lock").touch()
        os.utime(tmp_path / op / "lock", (time.time() - age, time.time() - age))
    assert stale_build_locks() == [tmp_path / "fused_adam" / "lock"]


def test_orphaned_shared_memory_is_what_no_process_maps(tmp_path, monkeypatch):
    import mmap
    import os

    from rlhf.engine import distributed

    monkeypatch.setattr(distributed, "SHARED_MEMORY_DIR", tmp_path)
    prefix = f"{distributed.SHARED_MEMORY_PREFIX}_{os.getuid()}_127.0.0.1"
    left, in_use = (tmp_path / f"{prefix}_{port}_0" for port in (1, 2))
    for path in (left, in_use, tmp_path / "other_file"):
        path.write_bytes(b"\0" * mmap.PAGESIZE)
    with in_use.open("r+b") as f, mmap.mmap(f.fileno(), mmap.PAGESIZE):  # as a live rank holds its peers' buffers
        assert distributed.orphaned_shared_memory() == [left]
