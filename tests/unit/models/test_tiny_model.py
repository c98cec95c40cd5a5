import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from rlhf.config import TinyModelConfig
from rlhf.errors import ModelError
from rlhf.models import build_char_tokenizer, build_tiny_model

ARCH = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_follows_tokenizer_and_arch(tokenizer):
    model = build_tiny_model(ARCH, tokenizer, seed=0)
    assert isinstance(model, LlamaForCausalLM)
    config = model.config
    assert config.vocab_size == len(tokenizer)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert config.num_key_value_heads == 2
    assert config.intermediate_size == 64 and config.max_position_embeddings == 64
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (0, 1, None)
    assert (model.generation_config.pad_token_id, model.generation_config.eos_token_id) == (0, 1)


def test_same_seed_same_weights_different_seed_different(tokenizer):
    first = build_tiny_model(ARCH, tokenizer, seed=3)
    assert _same_weights(first, build_tiny_model(ARCH, tokenizer, seed=3))
    other = build_tiny_model(ARCH, tokenizer, seed=4)
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_build_leaves_global_rng_untouched(tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(ARCH, tokenizer, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_heads_must_divide_hidden_size(tokenizer):
    bad = TinyModelConfig(hidden_size=30, num_layers=1, num_heads=4, intermediate_size=16)
    with pytest.raises(ModelError, match="divisible"):
        build_tiny_model(bad, tokenizer, seed=0)


def test_save_then_plain_auto_load_gives_identical_logits(tokenizer, tmp_path):
    model = build_tiny_model(ARCH, tokenizer, seed=0).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded_model.dtype == torch.float32
    assert loaded_model.generation_config.pad_token_id == 0
    ids = torch.tensor([loaded_tokenizer.encode("12+34=46")])
    assert ids.tolist()[0] == tokenizer.encode("12+34=46")
    with torch.no_grad():
        assert torch.equal(loaded_model(ids).logits, model(ids).logits)


def test_generate_stops_at_eos_and_pads(tokenizer):
    model = build_tiny_model(ARCH, tokenizer, seed=0).eval()
    batch = tokenizer(["ab"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 1 and out.shape[1] <= 7
