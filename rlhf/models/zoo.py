"""Every model role (policy, reference, reward model) is built here from a ModelConfig, so all stages agree.

The config is duck-typed: anything with `name_or_path, tokenizer, dtype, gradient_checkpointing,
attn_implementation, trust_remote_code, tiny` works (the `model` group of every stage).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Any, Iterator, Optional

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.config import ModelConfig
from rlhf.errors import ModelError
from rlhf.models.tiny import build_tiny_model
from rlhf.models.tokenizer import build_char_tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Any one of these makes a directory a tokenizer directory; without them transformers 5 would build an
# empty tokenizer from the model class, or fail with an error that does not name the directory.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tekken.json",
)


def torch_dtype(name: str) -> torch.dtype:
    """Map the config's short names to torch dtypes; anything else is a user error, not a KeyError."""
    if name not in DTYPES:
        raise ModelError(f"model.dtype={name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(model_cfg: Any, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """The tokenizer every role shares; it always has a pad token, because batching needs one.

    With no pad token the eos token pads (masks come from attention_mask, so the ids may coincide). With no
    eos either, a `<pad>` token is added and the loaders below grow the embeddings to match.
    """
    source = model_cfg.tokenizer or model_cfg.name_or_path
    if source is None:
        tokenizer = build_char_tokenizer()
    else:
        # Without model.tokenizer the tokenizer is the one beside the model: a wrong path is the model's.
        named = f"model.tokenizer={source}" if model_cfg.tokenizer else f"model.name_or_path={source}"
        location = _resolve(source, named)
        if os.path.isdir(location) and not any(os.path.isfile(os.path.join(location, f)) for f in TOKENIZER_FILES):
            raise ModelError(
                f"{location} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                f"set model.tokenizer=... to the tokenizer to use with this model"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=model_cfg.trust_remote_code)
        except OSError as error:
            raise _unreachable(source, named, error) from error
        except ValueError as error:
            raise ModelError(f"cannot load a tokenizer from {source}: {_first_line(error)}") from error
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            logger.info("Tokenizer %s has no pad token; padding with its eos token %r", source, tokenizer.eos_token)
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            logger.info("Tokenizer %s has neither pad nor eos token; added <pad> (the embeddings grow by one)", source)
    return tokenizer


def training_model_config(model_cfg: Any) -> Any:
    """The model config of weights that train: fp32 masters, whatever model.dtype says (bf16/fp16 compute is
    DeepSpeed's mixed precision); frozen models load in model.dtype itself."""
    cfg = copy.deepcopy(model_cfg)
    cfg.dtype = "fp32"
    return cfg


def load_policy(model_cfg: Any, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """The causal LM that is trained; weights follow `seed` wherever they are freshly initialised."""
    model = _load_causal_lm(model_cfg, tokenizer, seed)
    prepare_for_training(model, model_cfg)
    return model


def load_reference(model_cfg: Any, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A frozen copy of the policy's starting point; loaded the same way so the initial KL is exactly zero."""
    model = _load_causal_lm(model_cfg, tokenizer, seed)
    model.eval()
    model.requires_grad_(False)
    return model


def load_reward_model(
    name_or_path_or_cfg: Any, tokenizer: Optional[PreTrainedTokenizerBase], seed: int
) -> PreTrainedModel:
    """A sequence classifier with one output (the scalar reward).

    A causal-LM checkpoint (or the tiny preset, for null) keeps its backbone and gets a new `score` head,
    initialised from `seed`. `tokenizer=None` keeps the checkpoint's vocabulary and pad id as saved.
    """
    model_cfg = _as_model_config(name_or_path_or_cfg)
    dtype = torch_dtype(model_cfg.dtype)
    if model_cfg.name_or_path is None:
        if tokenizer is None:
            raise ModelError("the tiny reward model needs a tokenizer to size its vocabulary")
        causal = build_tiny_model(model_cfg.tiny, tokenizer, seed)
        model = _classifier_from_causal_lm(causal, seed).to(dtype)
        _set_attn_implementation(model, model_cfg)
    else:
        # A bare path is some other setting (a saved critic's directory), not the `model` group's name_or_path.
        named = (f"model.name_or_path={model_cfg.name_or_path}" if model_cfg is name_or_path_or_cfg
                 else f"reward model {model_cfg.name_or_path}")
        location = _resolve(model_cfg.name_or_path, named)
        config = _load_config(model_cfg.name_or_path, location, model_cfg, named)
        if is_sequence_classifier(config) and config.num_labels != 1:
            raise ModelError(
                f"{model_cfg.name_or_path} is a sequence classifier with {config.num_labels} labels; "
                f"a reward model needs exactly 1 (one scalar score per sequence)"
            )
        try:
            with _seeded(seed):
                model = AutoModelForSequenceClassification.from_pretrained(
                    location, num_labels=1, **_load_options(model_cfg)
                )
        except ValueError as error:
            raise ModelError(
                f"{model_cfg.name_or_path} (model type {config.model_type!r}) cannot be loaded as a reward model: "
                f"transformers has no sequence-classification head for it ({_first_line(error)})"
            ) from error
        except OSError as error:
            raise _unreachable(model_cfg.name_or_path, named, error) from error
    # A causal checkpoint's config still names the causal class until the classifier is saved.
    model.config.architectures = [type(model).__name__]
    if tokenizer is not None:
        _fit_to_tokenizer(model, tokenizer, seed)
    return model


def is_sequence_classifier(config: Any) -> bool:
    """Trust the saved architecture name: a causal LM's config also carries a (default) num_labels."""
    return any(name.endswith("ForSequenceClassification") for name in (config.architectures or []))


def prepare_for_training(model: PreTrainedModel, model_cfg: Any) -> None:
    """Activation checkpointing recomputes the forward, so the KV cache it would fill is switched off."""
    if not model_cfg.gradient_checkpointing:
        return
    # transformers 5.x renamed gradient_checkpointing_enable (now a deprecated alias); both default to
    # non-reentrant checkpointing, which needs no input that requires grad.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.config.use_cache = False


def _load_causal_lm(model_cfg: Any, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    if model_cfg.name_or_path is None:
        model = build_tiny_model(model_cfg.tiny, tokenizer, seed).to(torch_dtype(model_cfg.dtype))
        _set_attn_implementation(model, model_cfg)
    else:
        named = f"model.name_or_path={model_cfg.name_or_path}"
        location = _resolve(model_cfg.name_or_path, named)
        try:
            with _seeded(seed):
                model = AutoModelForCausalLM.from_pretrained(location, **_load_options(model_cfg))
        except OSError as error:
            raise _unreachable(model_cfg.name_or_path, named, error) from error
        except ValueError as error:
            raise ModelError(
                f"{model_cfg.name_or_path} cannot be loaded as a causal language model: {_first_line(error)}"
            ) from error
    _fit_to_tokenizer(model, tokenizer, seed)
    return model


def _classifier_from_causal_lm(causal: PreTrainedModel, seed: int) -> PreTrainedModel:
    """Same backbone weights, new one-output head: what from_pretrained does for a causal checkpoint, in memory."""
    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    with _seeded(seed):
        model = AutoModelForSequenceClassification.from_config(config)
    model.base_model.load_state_dict(causal.base_model.state_dict())
    return model


def _fit_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
    """Grow embeddings for tokens the tokenizer added, and tell the model and generation which id pads."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        with _seeded(seed):
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
        if generation_config.eos_token_id is None:
            generation_config.eos_token_id = tokenizer.eos_token_id


def _load_options(model_cfg: Any) -> dict:
    # transformers 5 takes `dtype=` (torch_dtype= is deprecated) and otherwise loads in the checkpoint's dtype.
    options = {"dtype": torch_dtype(model_cfg.dtype), "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation is not None:
        options["attn_implementation"] = model_cfg.attn_implementation
    return options


def _set_attn_implementation(model: PreTrainedModel, model_cfg: Any) -> None:
    if model_cfg.attn_implementation is not None:
        try:
            model.set_attn_implementation(model_cfg.attn_implementation)
        except (ValueError, ImportError) as error:
            raise ModelError(
                f"model.attn_implementation={model_cfg.attn_implementation!r} is not available: {_first_line(error)}"
            ) from error


def _load_config(source: str, location: str, model_cfg: Any, named: str) -> Any:
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=model_cfg.trust_remote_code)
    except OSError as error:
        raise _unreachable(source, named, error) from error
    except ValueError as error:
        raise ModelError(f"{source} holds no model config transformers understands: {_first_line(error)}") from error


def _as_model_config(source: Any) -> Any:
    if source is None or isinstance(source, (str, os.PathLike)):
        return ModelConfig(name_or_path=None if source is None else os.fspath(source))
    return source


def _resolve(source: str, named: str) -> str:
    """Local directories are used as they are; a path-like string that is not one fails here, before
    transformers spends a minute retrying the hub for a name that can only be a typo'd path.

    `named` says where `source` came from, e.g. "model.name_or_path=/data/llama" (the start of each message)."""
    expanded = os.path.expanduser(os.fspath(source))
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise ModelError(f"{named}: a file, not a directory; expected the directory that holds the model's "
                         f"config.json and weights (or the tokenizer's files), or a Hugging Face hub id")
    if os.path.isabs(expanded) or expanded.startswith(".") or expanded.count("/") > 1:
        full = os.path.abspath(expanded)
        raise ModelError(f"{named}: no such directory{f' ({full})' if full != source else ''}, and not a "
                         f"Hugging Face hub id (those read `org/name`)")
    return expanded


def _unreachable(source: str, named: str, error: BaseException) -> ModelError:
    from huggingface_hub import constants

    if os.path.isdir(os.path.expanduser(source)):
        return ModelError(f"{named}: cannot load from this directory ({_first_line(error)})")
    if constants.HF_HUB_OFFLINE:
        return ModelError(f"{named}: no such local directory, and not a hub id in the Hugging Face cache, the only "
                          f"place an offline run (HF_HUB_OFFLINE=1) loads from; give a local directory, or download "
                          f"the model once online")
    return ModelError(f"{named}: no such local directory, and not a hub id that loads ({_first_line(error)}); "
                      f"check the name, the network, and HF_TOKEN for gated models")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Freshly initialised weights (new heads, resized rows) depend on the seed only, not on RNG history."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
