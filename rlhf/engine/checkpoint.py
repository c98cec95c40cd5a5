"""Resumable checkpoints and Hugging Face exports, written atomically.

Layout of run.dir/checkpoints:
    step_00000100/            one finished checkpoint (renamed into place only when complete)
        <role>/...            DeepSpeed engine state per trainable role (model, optimizer, scheduler)
        rng_rank<r>.pt        python/numpy/torch RNG states of each rank
        trainer_state.json    step, samples seen, controllers: everything else needed to continue
    latest                    name of the newest finished checkpoint (replaced atomically)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from rlhf.engine import distributed as dist
from rlhf.errors import RLHFError
from rlhf.models.lora import adapter_of, merged_state_dict

STATE_FILE = "trainer_state.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, engines: Mapping[str, Any], state: Mapping[str, Any],
                    keep_last: int) -> Path:
    """Write step_<N> under root via a temporary directory, then rename it into place (all ranks call this)."""
    name = f"step_{step:08d}"
    tmp, final = root / f".tmp_{name}", root / name
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    for role, engine in engines.items():
        # with LoRA only the adapters (and a new head) train: the frozen base is the model's own, not checkpoint data
        frozen = {"exclude_frozen_parameters": True} if adapter_of(engine) is not None else {}
        engine.save_checkpoint(str(tmp), tag=role, save_latest=False, **frozen)
    torch.save(rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        (tmp / STATE_FILE).write_text(json.dumps(dict(state), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", name)
        for old in finished_checkpoints(root)[:-max(1, keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def finished_checkpoints(root: Path) -> list[Path]:
    """The finished checkpoints under `root` (a run's checkpoints/), oldest first: the step_* directories, never the
    .tmp_step_* that a kill mid-save leaves."""
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def find_checkpoint(run_dir: Path, resume: Any) -> Path | None:
    """The checkpoint run.resume points at: true -> the latest in run_dir, a path -> that one, false -> none."""
    if resume in (False, None, "false", "False", ""):
        return None
    if resume in (True, "true", "True"):
        root = run_dir / "checkpoints"
        latest = root / "latest"
        if latest.exists() and (root / latest.read_text().strip()).is_dir():
            return root / latest.read_text().strip()
        finished = finished_checkpoints(root)
        if finished:
            return finished[-1]
        raise RLHFError(f"run.resume=true but {root} holds no finished checkpoint; start without run.resume "
                        "(add run.overwrite=true to reuse the directory)")
    path = Path(str(resume))
    if path.is_dir() and (path / "latest").exists():
        path = path / (path / "latest").read_text().strip()
    elif path.is_dir() and (path / "checkpoints").is_dir():
        return find_checkpoint(path, True)
    if not (path / STATE_FILE).exists():
        raise RLHFError(f"run.resume={resume}: {path} is not a checkpoint directory (no {STATE_FILE})")
    return path


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def needs_universal(path: Path, world_size: int, zero_stage: int) -> bool:
    """Whether the checkpoint's optimizer state is partitioned for another layout than this run's (another number
    of processes, or another ZeRO stage): DeepSpeed then loads it only through its universal format."""
    state = read_state(path)
    partitioned = any(path.glob("*/*optim_states.pt"))
    saved_stage = int(state.get("zero_stage", zero_stage))
    return partitioned and (int(state.get("world_size", world_size)) != world_size or saved_stage != zero_stage)


def to_universal(path: Path, roles: list[str]) -> Path:
    """Convert the checkpoint's engines to DeepSpeed's universal format (per-parameter fp32 weights and Adam moments,
    loadable by any number of processes under any ZeRO stage), once, into path/universal; all ranks call this."""
    out = path / "universal"
    if dist.is_main() and not out.is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as convert

        tmp = path / ".tmp_universal"
        shutil.rmtree(tmp, ignore_errors=True)
        for role in roles:
            # inject_missing_state: plain data parallelism has no tensor-parallel layout to declare
            args = argparse.Namespace(input_folder=str(path / role), output_folder=str(tmp / role),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            with contextlib.redirect_stdout(io.StringIO()):
                convert(args)
        os.replace(tmp, out)
    dist.barrier()
    return out


def load_checkpoint(path: Path, engines: Mapping[str, Any], universal: bool = False) -> dict[str, Any]:
    """Restore engines and this rank's RNG; returns the trainer state saved with the checkpoint. `universal` loads
    the engines from the universal conversion (the engines were built with checkpoint.load_universal)."""
    source = to_universal(path, list(engines)) if universal else path
    for role, engine in engines.items():
        loaded, _ = engine.load_checkpoint(str(source), tag=role, load_module_strict=adapter_of(engine) is None)
        if loaded is None:
            raise RLHFError(f"checkpoint {path} has no state for {role!r}")
    rng_file = path / f"rng_rank{dist.rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return read_state(path)


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (gathered from shards under ZeRO-3); None on other ranks."""
    from rlhf.engine.engine import zero_stage

    if zero_stage(engine) == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if dist.is_main() else None
    if not dist.is_main():
        return None
    if adapter_of(engine) is not None:  # the adapters folded in: a plain model's weights
        return merged_state_dict(engine.module)
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def save_pretrained(model: torch.nn.Module, tokenizer, path: Path, state_dict=None, extra_files=None,
                    adapter=None) -> None:
    """Write a Hugging Face directory (model + tokenizer, and a peft `adapter` in its adapter/ subdirectory) via a
    temporary sibling, then rename it into place."""
    if not dist.is_main():
        return
    tmp = path.with_name(f".tmp_{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if adapter is not None:
        adapter.save_pretrained(tmp / "adapter")
    for name, content in (extra_files or {}).items():
        (tmp / name).write_text(content)
    # The previous export is moved aside, not deleted, before the new one takes its name: a crash at any point
    # leaves a complete directory (final/, or .old_final/ in the instant between the two renames).
    old = path.with_name(f".old_{path.name}")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
