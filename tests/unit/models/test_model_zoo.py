import logging

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
    ViTModel,
)

from rlhf.config import ModelConfig, TinyModelConfig
from rlhf.errors import ModelError
from rlhf.models import (
    build_char_tokenizer,
    build_tiny_model,
    is_sequence_classifier,
    last_token_scores,
    load_policy,
    load_reference,
    load_reward_model,
    load_tokenizer,
    torch_dtype,
)

ARCH = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)
CORPUS = ["the quick brown fox jumps over the lazy dog", "12+34=46", "hello world, hello there"] * 20
TEXTS = ["hello world 12+34=46", "the fox", "hi"]
ARCHITECTURES = ["llama", "gpt2", "qwen2"]


def _bpe_tokenizer(pad_is_eos: bool) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE whose only special token is <|endoftext|>."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    special = {"eos_token": "<|endoftext|>"}
    if pad_is_eos:
        special["pad_token"] = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def _bare_tokenizer() -> PreTrainedTokenizerFast:
    """No pad, no eos, no special token at all."""
    vocab = {char: index for index, char in enumerate("?abcdefghijklmnopqrstuvwxyz 0123456789+=")}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _small_model(name: str, vocab_size: int):
    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    if name == "qwen2":
        config = Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
        return Qwen2ForCausalLM(config)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """llama: char tokenizer (own pad); gpt2: no pad token; qwen2: pad token is the eos token; bare: neither."""
    tokenizers = {
        "llama": build_char_tokenizer(),
        "gpt2": _bpe_tokenizer(pad_is_eos=False),
        "qwen2": _bpe_tokenizer(pad_is_eos=True),
        "bare": _bare_tokenizer(),
    }
    dirs = {}
    for name, tokenizer in tokenizers.items():
        directory = tmp_path_factory.mktemp(name)
        _small_model("llama" if name == "bare" else name, len(tokenizer)).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        dirs[name] = directory
    return dirs


def _cfg(path, **overrides) -> ModelConfig:
    return ModelConfig(name_or_path=None if path is None else str(path), tiny=ARCH, **overrides)


def _batch(tokenizer, texts=TEXTS):
    return tokenizer(texts, padding=True, return_tensors="pt")


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_torch_dtype():
    assert torch_dtype("fp32") is torch.float32
    assert torch_dtype("bf16") is torch.bfloat16
    assert torch_dtype("fp16") is torch.float16
    with pytest.raises(ModelError, match="fp64"):
        torch_dtype("fp64")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_tokenizer_always_has_pad_and_pads_right(model_dirs, name, caplog):
    with caplog.at_level(logging.INFO, logger="rlhf.models.zoo"):
        tokenizer = load_tokenizer(_cfg(model_dirs[name]))
    assert tokenizer.pad_token is not None
    assert tokenizer.padding_side == "right"
    if name == "llama":
        assert tokenizer.pad_token_id != tokenizer.eos_token_id
    else:
        assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert ("padding with its eos token" in caplog.text) == (name == "gpt2")
    assert load_tokenizer(_cfg(model_dirs[name]), padding_side="left").padding_side == "left"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_policy_logits_on_padded_batch_match_unpadded_rows(model_dirs, name):
    tokenizer = load_tokenizer(_cfg(model_dirs[name]))
    policy = load_policy(_cfg(model_dirs[name]), tokenizer, seed=0).eval()
    assert policy.config.pad_token_id == tokenizer.pad_token_id
    batch = _batch(tokenizer)
    assert batch["attention_mask"].sum(-1).tolist() != [batch["input_ids"].shape[1]] * len(TEXTS)
    with torch.no_grad():
        padded = policy(**batch).logits
        for row, length in enumerate(batch["attention_mask"].sum(-1).tolist()):
            single = policy(input_ids=batch["input_ids"][row : row + 1, :length]).logits[0]
            torch.testing.assert_close(padded[row, :length], single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_reference_is_frozen_copy_of_policy(model_dirs, name):
    tokenizer = load_tokenizer(_cfg(model_dirs[name]))
    policy = load_policy(_cfg(model_dirs[name]), tokenizer, seed=0)
    reference = load_reference(_cfg(model_dirs[name]), tokenizer, seed=0)
    assert _same_weights(policy, reference)
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in policy.parameters())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_reward_model_from_causal_lm(model_dirs, name):
    tokenizer = load_tokenizer(_cfg(model_dirs[name]))
    reward_model = load_reward_model(str(model_dirs[name]), tokenizer, seed=0)
    assert is_sequence_classifier(reward_model.config)
    assert reward_model.config.num_labels == 1
    assert reward_model.config.pad_token_id == tokenizer.pad_token_id
    causal = load_policy(_cfg(model_dirs[name]), tokenizer, seed=0)
    backbone, causal_backbone = reward_model.base_model.state_dict(), causal.base_model.state_dict()
    assert backbone.keys() == causal_backbone.keys()
    assert all(torch.equal(backbone[k], causal_backbone[k]) for k in backbone)
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert reward_model(**batch).logits.shape == (len(TEXTS), 1)
    same_seed = load_reward_model(model_dirs[name], tokenizer, seed=0)
    other_seed = load_reward_model(model_dirs[name], tokenizer, seed=1)
    assert torch.equal(reward_model.score.weight, same_seed.score.weight)
    assert not torch.equal(reward_model.score.weight, other_seed.score.weight)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_last_token_scores_read_the_last_real_token_even_when_it_is_eos(model_dirs, name):
    tokenizer = load_tokenizer(_cfg(model_dirs[name]))
    reward_model = load_reward_model(model_dirs[name], tokenizer, seed=0).eval()
    batch = _batch(tokenizer, [text + tokenizer.eos_token for text in TEXTS])
    with torch.no_grad():
        scores = last_token_scores(reward_model, batch["input_ids"], batch["attention_mask"])
        assert scores.shape == (len(TEXTS),) and scores.dtype == torch.float32
        for row, length in enumerate(batch["attention_mask"].sum(-1).tolist()):
            hidden = reward_model.base_model(input_ids=batch["input_ids"][row : row + 1, :length]).last_hidden_state
            torch.testing.assert_close(scores[row], reward_model.score(hidden)[0, -1, 0], atol=1e-5, rtol=0)


def test_tokenizer_without_pad_or_eos_gets_pad_and_embeddings_grow(model_dirs):
    cfg = _cfg(model_dirs["bare"])
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token is None
    policy = load_policy(cfg, tokenizer, seed=0)
    assert policy.get_input_embeddings().num_embeddings == len(tokenizer)
    assert policy.config.pad_token_id == tokenizer.pad_token_id == len(tokenizer) - 1
    assert _same_weights(policy, load_reference(cfg, tokenizer, seed=0))
    reward_model = load_reward_model(cfg, tokenizer, seed=0)
    assert reward_model.get_input_embeddings().num_embeddings == len(tokenizer)
    with torch.no_grad():
        assert reward_model(**_batch(tokenizer, ["ab", "abc"])).logits.shape == (2, 1)


def test_tiny_roles_share_weights_by_seed():
    tokenizer = load_tokenizer(_cfg(None))
    assert tokenizer.get_vocab() == build_char_tokenizer().get_vocab()
    policy = load_policy(_cfg(None), tokenizer, seed=5)
    assert _same_weights(policy, build_tiny_model(ARCH, tokenizer, seed=5))
    assert _same_weights(policy, load_reference(_cfg(None), tokenizer, seed=5))
    reward_model = load_reward_model(_cfg(None), tokenizer, seed=5)
    assert reward_model.config.num_labels == 1 and reward_model.config.pad_token_id == 0
    assert is_sequence_classifier(reward_model.config)
    backbone = reward_model.base_model.state_dict()
    assert all(torch.equal(backbone[k], v) for k, v in policy.base_model.state_dict().items())
    assert torch.equal(reward_model.score.weight, load_reward_model(_cfg(None), tokenizer, seed=5).score.weight)
    with torch.no_grad():
        assert reward_model(**_batch(tokenizer)).logits.shape == (len(TEXTS), 1)


@pytest.mark.parametrize("path", [None, "llama"])
def test_dtype_gradient_checkpointing_and_attention_pass_through(model_dirs, path):
    location = None if path is None else model_dirs[path]
    cfg = _cfg(location, dtype="bf16", gradient_checkpointing=True, attn_implementation="eager")
    tokenizer = load_tokenizer(cfg)
    policy = load_policy(cfg, tokenizer, seed=0)
    assert policy.dtype == torch.bfloat16
    assert policy.is_activation_checkpointing and policy.config.use_cache is False
    assert policy.config._attn_implementation == "eager"
    policy.train()
    batch = _batch(tokenizer)
    policy(**batch, labels=batch["input_ids"]).loss.backward()
    assert policy.get_input_embeddings().weight.grad is not None
    assert load_reward_model(cfg, tokenizer, seed=0).dtype == torch.bfloat16


@pytest.mark.parametrize("loader", ["tokenizer", "policy", "reward"])
def test_missing_directory_names_the_path(tmp_path, loader):
    missing = tmp_path / "no" / "such_model"
    tokenizer = build_char_tokenizer()
    with pytest.raises(ModelError, match="no such directory") as error:
        if loader == "tokenizer":
            load_tokenizer(_cfg(missing))
        elif loader == "policy":
            load_policy(_cfg(missing), tokenizer, seed=0)
        else:
            load_reward_model(str(missing), tokenizer, seed=0)
    assert str(missing) in str(error.value)


def test_model_directory_without_tokenizer(tmp_path):
    _small_model("llama", len(build_char_tokenizer())).save_pretrained(tmp_path / "model")
    build_char_tokenizer().save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ModelError, match="model.tokenizer=") as error:
        load_tokenizer(_cfg(tmp_path / "model"))
    assert str(tmp_path / "model") in str(error.value)
    tokenizer = load_tokenizer(_cfg(tmp_path / "model", tokenizer=str(tmp_path / "tokenizer")))
    assert tokenizer.pad_token_id == 0


def test_reward_model_with_several_labels_is_rejected(tmp_path):
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_labels=3
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="3 labels") as error:
        load_reward_model(str(tmp_path), None, seed=0)
    assert str(tmp_path) in str(error.value)


def test_model_without_sequence_classification_head_is_rejected(tmp_path):
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4
    )
    ViTModel(config).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="cannot be loaded as a reward model") as error:
        load_reward_model(str(tmp_path), None, seed=0)
    assert "vit" in str(error.value)


def test_one_label_classifier_keeps_its_head(model_dirs, tmp_path):
    tokenizer = load_tokenizer(_cfg(model_dirs["llama"]))
    reward_model = load_reward_model(model_dirs["llama"], tokenizer, seed=0)
    with torch.no_grad():
        reward_model.score.weight.fill_(0.25)
    reward_model.save_pretrained(tmp_path)
    reloaded = load_reward_model(str(tmp_path), tokenizer, seed=7)
    assert is_sequence_classifier(reloaded.config)
    assert _same_weights(reloaded, reward_model)
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(tmp_path), LlamaForSequenceClassification)
