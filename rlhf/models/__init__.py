"""Tokenizers and models for every role: policy, reference, reward model and critic."""

from rlhf.models.critic import ValueModel, build_critic, last_token_scores, load_critic
from rlhf.models.tiny import build_tiny_model
from rlhf.models.tokenizer import build_char_tokenizer
from rlhf.models.zoo import (
    is_sequence_classifier,
    load_policy,
    load_reference,
    load_reward_model,
    load_tokenizer,
    prepare_for_training,
    torch_dtype,
)

__all__ = [
    "ValueModel",
    "build_char_tokenizer",
    "build_critic",
    "build_tiny_model",
    "is_sequence_classifier",
    "last_token_scores",
    "load_critic",
    "load_policy",
    "load_reference",
    "load_reward_model",
    "load_tokenizer",
    "prepare_for_training",
    "torch_dtype",
]
