"""Switching dropout off in a model whose rollout and update must compute the same function."""

from __future__ import annotations

import torch


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability of `model` to 0 and return how many were above 0.

    Covers `nn.Dropout` modules (GPT-2's residual, embedding and attention dropout) and the float
    `attention_dropout` that Llama-family attention modules pass to their attention kernel in training mode
    (and its config value, which some kernels read). As TRL's `disable_dropout_in_model`, plus that float."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p, changed = 0.0, changed + 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout, changed = 0.0, changed + 1
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"):
        if isinstance(getattr(config, key, None), float) and getattr(config, key) > 0:
            setattr(config, key, 0.0)
    return changed
