"""LoRA adapters (peft) on the model a stage trains, and what a run needs around them.

`add_adapters` injects peft's LoRA layers into the model and returns the model itself, so every stage's code (the
packed forward, a reward model's backbone and head, DeepSpeed) sees the same Hugging Face model it would without
adapters; the peft wrapper that knows the adapters is kept in a side table (`adapter_of`). Only the adapters (and a
reward model's new score head) require grad, so the optimizer holds only them.

The reference policy of dpo, ppo and grpo is then the base model, read with the adapters switched off
(`AdapterOff`): no second copy of the weights. The export (`merged_state_dict`) folds each adapter into its layer,
W + (alpha / r) B A, under the plain model's parameter names, so transformers loads final/ as an ordinary model.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch import nn

_ADAPTED: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
ADAPTER = "default"


def add_adapters(model: nn.Module, lora_cfg: Any, head: Optional[str] = None) -> nn.Module:
    """`model` with LoRA adapters of rank lora_cfg.r on lora_cfg.target_modules (null: every linear layer but the
    output head); only the adapters train, and the layer named `head` (a reward model's new score head) trains whole."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora_cfg.target_modules) if lora_cfg.target_modules else "all-linear"
    config = LoraConfig(r=int(lora_cfg.r), lora_alpha=float(lora_cfg.alpha), lora_dropout=float(lora_cfg.dropout),
                        target_modules=targets, exclude_modules=[head] if head else None)
    peft_model = get_peft_model(model, config)
    base = peft_model.get_base_model()
    if head:
        getattr(base, head).requires_grad_(True)
    _ADAPTED[base] = peft_model
    return base


def adapter_of(model: nn.Module) -> Any:
    """The peft model holding `model`'s adapters (`model` or the model a DeepSpeed engine wraps), or None."""
    return _ADAPTED.get(getattr(model, "module", model))


class AdapterOff(nn.Module):
    """A reference policy that is `model` with its adapters switched off, in eval mode, for the length of each call.

    It holds the model without registering it, so switching this module's mode or listing its parameters for an
    optimizer does not touch the policy's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["policy"] = getattr(model, "module", model)

    @property
    def config(self):
        return self.policy.config

    def parameters(self, recurse: bool = True):
        return self.policy.parameters(recurse)

    def forward(self, *args, **kwargs):
        policy, was_training = self.policy, self.policy.training
        policy.eval()
        try:
            with adapter_of(policy).disable_adapter():
                return policy(*args, **kwargs)
        finally:
            policy.train(was_training)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights with every adapter folded into its layer, under the names the model has without adapters
    (the model itself is not changed)."""
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, value in model.state_dict().items():
        if ".lora_" not in name:
            state[name.replace(".base_layer.", ".")] = value.detach().cpu()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            key = f"{name}.weight"
            state[key] = (state[key] + module.get_delta_weight(ADAPTER).detach().cpu()).to(state[key].dtype)
    return state
