"""The PPO critic: a transformer backbone with a linear head that gives one value per token.

It wraps a one-label sequence classifier rather than assembling its own modules, because that classifier
already is "backbone + linear `score` head": saving it gives a layout `AutoModelForSequenceClassification`
reloads, and a reward model is a ready-made critic initialisation.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import ModelConfig
from rlhf.errors import ModelError
from rlhf.models.zoo import load_reward_model, prepare_for_training

CRITIC_INITS = ("reward_model", "policy")


class ValueModel(nn.Module):
    """V(s_t) for every prefix of a sequence; the classifier's pooling to one position is bypassed."""

    def __init__(self, classifier: PreTrainedModel):
        super().__init__()
        head = getattr(classifier, "score", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ModelError(
                f"{type(classifier).__name__} cannot serve as a critic: it needs a linear `score` head with one "
                f"output (decoder-style sequence classifiers such as Llama, Qwen2 and GPT-2 have one)"
            )
        self.classifier = classifier

    @property
    def backbone(self) -> nn.Module:
        return self.classifier.base_model

    @property
    def value_head(self) -> nn.Linear:
        return self.classifier.score

    @property
    def config(self) -> Any:
        return self.classifier.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Optional[Tensor] = None) -> Tensor:
        """values [B, T] in float32, whatever the backbone's dtype, so the value loss is computed in full precision.

        Positions count real tokens only (as generation does for left-padded prompts): models with absolute
        position embeddings (GPT-2) would otherwise see a left-padded row at shifted positions."""
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()

    def save_pretrained(self, directory: str) -> None:
        self.classifier.save_pretrained(directory)


def build_critic(
    init: str,
    model_cfg: Any,
    reward_model_path: Any,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
) -> ValueModel:
    """init="reward_model": the reward model's backbone and score head (it already ranks responses);
    init="policy": the policy's backbone with a zero head, so every initial value is 0 and early advantages
    are the raw returns rather than noise from a random head."""
    if init == "reward_model":
        if reward_model_path is None:
            raise ModelError("critic init=reward_model needs a reward model path; set it, or use init=policy")
        if isinstance(reward_model_path, (str, os.PathLike)):
            # The critic trains alongside the policy, so it takes the policy's precision and attention kernel.
            reward_model_path = ModelConfig(
                name_or_path=os.fspath(reward_model_path),
                dtype=model_cfg.dtype,
                attn_implementation=model_cfg.attn_implementation,
                trust_remote_code=model_cfg.trust_remote_code,
            )
        classifier = load_reward_model(reward_model_path, tokenizer, seed)
    elif init == "policy":
        classifier = load_reward_model(model_cfg, tokenizer, seed)
    else:
        raise ModelError(f"critic init={init!r} is not one of {', '.join(CRITIC_INITS)}")
    critic = ValueModel(classifier)
    if init == "policy":
        with torch.no_grad():
            critic.value_head.weight.zero_()
            if critic.value_head.bias is not None:
                critic.value_head.bias.zero_()
    prepare_for_training(classifier, model_cfg)
    return critic


def load_critic(name_or_path_or_cfg: Any, tokenizer: Optional[PreTrainedTokenizerBase] = None) -> ValueModel:
    """Reload a critic written by `ValueModel.save_pretrained` (or any one-label sequence classifier)."""
    return ValueModel(load_reward_model(name_or_path_or_cfg, tokenizer, seed=0))


def last_token_scores(classifier: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Reward per sequence [B], read at the last position attention_mask marks as real.

    The classifier's own pooling finds that position by comparing ids with pad_token_id, which picks the
    wrong token when the pad token is the eos token and the sequence ends in eos; the mask has no such trap.
    """
    values = ValueModel(classifier)(input_ids, attention_mask)
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(-1)
    return values.gather(-1, last.unsqueeze(-1)).squeeze(-1)
