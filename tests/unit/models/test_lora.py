"""LoRA adapters: what trains, the reference with adapters off, and the export with adapters folded in."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification)

from rlhf.config import LoRAConfig
from rlhf.models.lora import AdapterOff, adapter_of, add_adapters, merged_state_dict

SMALL = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
IDS = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])


def lora(**kwargs):
    return OmegaConf.structured(LoRAConfig(r=4, **kwargs))


def build(name="llama", seed=0):
    torch.manual_seed(seed)
    if name == "gpt2":  # Conv1D layers, weights stored transposed (peft's fan_in_fan_out)
        return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0)).eval()
    return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()


def train_adapters(model):
    """Move every adapter off its zero start (lora_B starts at 0, which would hide a wrong fold)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)


def test_only_adapters_train_and_the_output_head_gets_none():
    model = add_adapters(build(), lora())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(n.startswith("lm_head") for n in trainable)
    assert adapter_of(model) is not None and adapter_of(build()) is None
    # every linear layer of every block: q, k, v, o, gate, up, down, 2 layers x 2 matrices each
    assert len(trainable) == 7 * 2 * 2
    only_q = add_adapters(build(), lora(target_modules=["q_proj"]))
    assert len([p for p in only_q.parameters() if p.requires_grad]) == 2 * 2


def test_a_reward_models_new_head_trains_whole_and_gets_no_adapter():
    torch.manual_seed(0)
    classifier = LlamaForSequenceClassification(LlamaConfig(**SMALL, num_labels=1, pad_token_id=0))
    model = add_adapters(classifier, lora(), head="score")
    assert isinstance(model.score, torch.nn.Linear) and model.score.weight.requires_grad
    assert not any("score.lora" in n for n, _ in model.named_parameters())


def test_adapter_off_is_the_base_model_and_holds_no_copy():
    base = build()
    model = add_adapters(build(), lora())
    train_adapters(model)
    model.train()
    reference = AdapterOff(model)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=IDS).logits, base(input_ids=IDS).logits)
        torch.testing.assert_close(reference(input_ids=IDS).logits, base(input_ids=IDS).logits)
    assert model.training, "the policy's mode is restored after a reference call"
    assert {id(p) for p in reference.parameters()} == {id(p) for p in model.parameters()}
    assert list(reference.children()) == [] and reference.config is model.config
    with torch.no_grad():  # the adapters are back on after the call
        assert not torch.allclose(model.eval()(input_ids=IDS).logits, base(input_ids=IDS).logits)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merged_weights_load_into_the_plain_model_and_give_the_adapted_outputs(name):
    model = add_adapters(build(name), lora(alpha=8.0))
    train_adapters(model)
    state = merged_state_dict(model)
    plain = build(name, seed=1)
    assert plain.load_state_dict(state, strict=False).missing_keys == []
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5, rtol=1e-4)
    assert not any("lora" in k or "base_layer" in k for k in state)


def test_alpha_scales_the_folded_update():
    """alpha / r multiplies each adapter's update: the same adapters at 4x the alpha fold in 4x the change."""
    base = build().state_dict()["model.layers.0.self_attn.q_proj.weight"]
    deltas = []
    for alpha in (4.0, 16.0):
        model = add_adapters(build(), lora(alpha=alpha))
        torch.manual_seed(1)
        train_adapters(model)
        deltas.append(merged_state_dict(model)["model.layers.0.self_attn.q_proj.weight"] - base)
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[1], 4 * deltas[0], atol=1e-6, rtol=1e-5)
