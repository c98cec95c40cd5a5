"""DeepSpeed engines for trainable models, built from one run config."""

from __future__ import annotations

import copy
import math
import weakref
from functools import partial
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf.engine.guard import StepGuard, step_with_lr_zero
from rlhf.errors import ConfigError


def deep_merge(base: dict, extra: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(cfg: DictConfig, world_size: int, lr: float | None = None,
                     grad_accum: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config: the conf/deepspeed fragment, values derived from the run, then raw overrides.

    `grad_accum` overrides trainer.grad_accum for stages that derive it (RL: samples per rank / micro batch)."""
    trainer = cfg.trainer
    grad_accum = trainer.grad_accum if grad_accum is None else grad_accum
    if trainer.micro_batch_size < 1 or grad_accum < 1:
        raise ConfigError(
            f"trainer.micro_batch_size ({trainer.micro_batch_size}) and trainer.grad_accum ({grad_accum}) "
            "must both be at least 1"
        )
    dtype = cfg.model.dtype
    on_cpu = not torch.cuda.is_available()
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": trainer.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": float(trainer.max_grad_norm),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(trainer.lr if lr is None else lr),
                "betas": [float(b) for b in trainer.betas],
                "eps": 1e-8,
                "weight_decay": float(trainer.weight_decay),
                # DeepSpeed's fused Adam is a JIT-built C++ op on CPU (a compile per environment, and a hang
                # for every later run if a build is killed holding its lock); torch's AdamW needs no build, and
                # its fused kernel (one pass over all tensors) steps 4-5x faster than its per-tensor loop.
                "torch_adam": on_cpu,
                **({"fused": True} if on_cpu else {}),  # DeepSpeed's own FusedAdam (CUDA) takes no such key
            },
        },
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    fragment = OmegaConf.to_container(cfg.deepspeed.config, resolve=True) or {}
    overrides = OmegaConf.to_container(cfg.deepspeed.overrides, resolve=True) or {}
    return deep_merge(deep_merge(derived, fragment), overrides)


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine/linear decay to min_ratio (or constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1 - (1 - min_ratio) * progress
    raise ConfigError(f"trainer.lr_scheduler must be cosine, linear or constant, got {kind!r}")


def build_engine(model: torch.nn.Module, cfg: DictConfig, world_size: int, lr: float | None = None,
                 grad_accum: int | None = None, optimizer_steps: int | None = None):
    """deepspeed.initialize with AdamW and our warm-up/decay schedule (its state is checkpointed by DeepSpeed).

    `optimizer_steps` is the schedule's length when a trainer step holds several updates (RL iterations)."""
    import deepspeed

    trainer = cfg.trainer
    total = optimizer_steps or trainer.max_steps
    lr_factor(0, trainer.warmup_steps, total, trainer.lr_scheduler, trainer.min_lr_ratio)
    schedule = partial(lr_factor, warmup_steps=trainer.warmup_steps, total_steps=total,
                       kind=trainer.lr_scheduler, min_ratio=trainer.min_lr_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=deepspeed_config(cfg, world_size, lr, grad_accum),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    _GUARDS[engine] = StepGuard(cfg.guard.max_bad_steps, zero_stage(engine))
    return engine


_GUARDS: "weakref.WeakKeyDictionary[Any, StepGuard]" = weakref.WeakKeyDictionary()
"""The numeric guard of each training engine build_engine made, kept beside the engine rather than set on it."""


def guard_of(engine) -> Optional[StepGuard]:
    """The numeric guard of a training engine from build_engine (None for any other engine or module)."""
    try:
        return _GUARDS.get(engine)
    except TypeError:  # an object that cannot be weakly referenced was never an engine of ours
        return None


def frozen_model(model: torch.nn.Module, cfg: DictConfig, world_size: int, device: torch.device) -> torch.nn.Module:
    """A frozen model of an RL stage (the reference, the reward model), ready for no-grad forwards.

    Under ZeRO-3 it runs in a DeepSpeed engine without optimizer, its weights partitioned over the processes like
    the policy's (each holds 1/N, a forward gathers a layer at a time; ZeRO-3's offload_param applies too), so a
    large reference needs no whole copy per GPU. Every rank must then run the same forwards, as the trainers do.
    Otherwise it is the plain model on this process's device."""
    ds = deepspeed_config(cfg, world_size)
    zero = ds.get("zero_optimization") or {}
    if configured_zero_stage(ds) != 3:
        return model.to(device)
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
              "gradient_accumulation_steps": 1, "train_batch_size": ds["train_micro_batch_size_per_gpu"] * world_size,
              "zero_optimization": {k: v for k, v in zero.items() if k == "stage" or k.startswith(
                  ("offload_param", "stage3_param", "stage3_prefetch", "stage3_max_live"))},
              "bf16": ds["bf16"], "fp16": ds["fp16"], "steps_per_print": ds["steps_per_print"]}
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine.module


def configured_zero_stage(cfg_or_ds: DictConfig | Mapping[str, Any]) -> int:
    """The ZeRO stage a run's engines are built with: of a run config (its fragment and deepspeed.overrides, merged
    as deepspeed_config merges them), or of a DeepSpeed config already derived."""
    ds = deepspeed_config(cfg_or_ds, world_size=1) if isinstance(cfg_or_ds, DictConfig) else cfg_or_ds
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0


def backward(engine, loss: torch.Tensor, what: str = "loss") -> None:
    """engine.backward(loss), unless the loss is not finite: then a zero-gradient stand-in (see engine.guard)."""
    guard = guard_of(engine)
    engine.backward(loss if guard is None else guard.checked_loss(engine, loss, what))


def optimizer_step(engine) -> float | None:
    """engine.step() for one micro-batch; at an accumulation boundary returns the global gradient norm
    before clipping (DeepSpeed reports it for ZeRO/mixed-precision optimizers but not for plain fp32 ZeRO-0).
    An update whose loss or (measured) gradient was not finite runs at learning rate 0 (engine.guard)."""
    norm = None
    boundary = engine.is_gradient_accumulation_boundary()
    if boundary and zero_stage(engine) == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
    guard = guard_of(engine)
    if boundary and guard is not None:
        guard.gradient_norm(norm)
    if boundary and guard is not None and guard.skip:
        step_with_lr_zero(engine)
        return norm
    engine.step()
    if boundary and norm is None:
        reported = engine.get_global_grad_norm()
        norm = float(reported) if reported is not None else None
    return norm
