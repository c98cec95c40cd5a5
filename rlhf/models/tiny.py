"""The embedded Llama-style model, built from `model.tiny` when no checkpoint is named."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from rlhf.config import TinyModelConfig
from rlhf.errors import ModelError


def tiny_llama_config(arch: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """Size the vocabulary from the tokenizer so every id it can produce has an embedding row."""
    if arch.hidden_size % arch.num_heads != 0:
        raise ModelError(
            f"model.tiny.hidden_size={arch.hidden_size} is not divisible by model.tiny.num_heads={arch.num_heads}"
        )
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def build_tiny_model(arch: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """Initialise under a forked RNG so the weights depend on `seed` alone and the caller's RNG stream is untouched."""
    config = tiny_llama_config(arch, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return model
