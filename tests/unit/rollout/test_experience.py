import pytest
import torch

from rlhf.config import TinyModelConfig
from rlhf.models.tiny import build_tiny_model
from rlhf.models.packing import enable_packing
from rlhf.models.tokenizer import build_char_tokenizer
from rlhf.rollout.experience import batched_logprobs, build_experience, response_logprobs
from rlhf.rollout.generation import SamplingParams, generate, response_lengths


def tiny():
    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok, 0)
    return tok, model.eval()


def test_layout_and_masks_come_from_lengths_not_pad_ids():
    eos = 1
    # pad id == eos id: masks must still mark the first EOS as a real token and nothing after it
    exp = build_experience([[5, 6, 7], [8]], [[9, eos], [10, 11, 12]], pad_id=eos, eos_id=eos, max_new_tokens=3)
    assert exp.prompt_width == 3
    assert exp.sequences.tolist() == [[5, 6, 7, 9, eos, eos], [eos, eos, 8, 10, 11, 12]]
    assert exp.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert exp.action_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert exp.truncated.tolist() == [False, True]


def test_response_lengths_stop_at_first_eos():
    lengths, ended = response_lengths(torch.tensor([[3, 1, 1, 1], [3, 4, 5, 6]]), eos_id=1)
    assert lengths.tolist() == [2, 4] and ended.tolist() == [True, False]


def test_logprobs_of_a_left_padded_row_equal_the_unpadded_row():
    tok, model = tiny()
    long_p, short_p = [10, 11, 12, 13], [14, 15]
    exp = build_experience([long_p, short_p], [[20, 21], [22, 23]], tok.pad_token_id, tok.eos_token_id, 8)
    both = batched_logprobs(model, exp, micro_batch_size=2)
    alone = batched_logprobs(model, build_experience([short_p], [[22, 23]], tok.pad_token_id, tok.eos_token_id, 8), 1)
    torch.testing.assert_close(both[1], alone[0], atol=1e-5, rtol=1e-5)
    # and equal to a plain full-logits computation
    logits = model(input_ids=torch.tensor([short_p + [22, 23]])).logits.log_softmax(-1)
    plain = logits[0, [1, 2], [22, 23]]
    torch.testing.assert_close(alone[0], plain, atol=1e-5, rtol=1e-5)


def test_generation_then_logprobs_are_consistent_and_grad_flows():
    tok, model = tiny()
    prompts = [tok("12+3=")["input_ids"], tok("7+8=")["input_ids"]]
    torch.manual_seed(0)
    responses = generate(model, prompts, tok.pad_token_id, tok.eos_token_id, SamplingParams(max_new_tokens=6), 4)
    exp = build_experience(prompts, responses, tok.pad_token_id, tok.eos_token_id, 6)
    old = batched_logprobs(model, exp, 2)
    model.train()
    new, entropy = response_logprobs(model, exp, with_entropy=True)
    torch.testing.assert_close(new.detach(), old, atol=1e-5, rtol=1e-5)  # ratio 1 on the first pass
    (new * exp.action_mask).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert entropy.shape == new.shape


def test_values_are_read_before_each_response_token_and_after_the_last():
    from rlhf.models.critic import build_critic
    from rlhf.config import ModelConfig
    from rlhf.rollout.experience import batched_values

    tok, _ = tiny()
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    critic = build_critic("policy", cfg, None, tok, 0)
    torch.nn.init.normal_(critic.value_head.weight)
    long_p, short_p = [10, 11, 12, 13], [14, 15]
    exp = build_experience([long_p, short_p], [[20, 21, 22], [23]], tok.pad_token_id, tok.eos_token_id, 8)
    before, after = batched_values(critic, exp, micro_batch_size=1)
    # the short row alone, unpadded: V at the last prompt token, then at each response token
    plain = critic(torch.tensor([short_p + [23]]), torch.ones(1, 3, dtype=torch.long))[0]
    torch.testing.assert_close(before[1], torch.stack([plain[1], torch.tensor(0.0), torch.tensor(0.0)]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[1], plain[2], atol=1e-5, rtol=1e-5)
    full = critic(torch.tensor([long_p + [20, 21, 22]]), torch.ones(1, 7, dtype=torch.long))[0]
    torch.testing.assert_close(before[0], full[3:6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[0], full[6], atol=1e-5, rtol=1e-5)


def grouped_experience(tok, group=3):
    """Two prompts of different lengths (so one is left-padded), each with `group` responses of varied length."""
    prompts = [[10, 11, 12, 13]] * group + [[14, 15]] * group
    responses = [[20 + i % 7 for i in range(n)] for n in (5, 2, 7, 3, 6, 1)[:2 * group]]
    responses = [r + [tok.eos_token_id] if i % 2 else r for i, r in enumerate(responses)]
    return build_experience(prompts, responses, tok.pad_token_id, tok.eos_token_id, 8)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_a_shared_prompt_forward_gives_the_same_logprobs_entropy_and_gradient(arch):
    """A group's prompt run once, its keys and values reused by every response (or packed padding-free, each prompt
    once), is the same computation as one forward per row: same log-probs and entropies, and the same parameter
    gradient (the prompt's is summed)."""
    tok, model = tiny() if arch == "llama" else small_hf(arch)
    exp = grouped_experience(tok)
    model.train()
    results = []
    for mode in ("plain", "shared", "packed"):
        if mode == "packed":
            assert enable_packing(model)
        model.zero_grad()
        logprobs, entropy = response_logprobs(model, exp, with_entropy=True, shared_prefix=mode == "shared")
        ((logprobs * exp.action_mask).sum() + (entropy * exp.action_mask).sum()).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logprobs.detach() * exp.action_mask, entropy * exp.action_mask, grad))
    for one, shared, packed in zip(*results):
        torch.testing.assert_close(shared, one, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packed, one, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(batched_logprobs(model, exp, 4, shared_prefix=True) * exp.action_mask,
                                   results[0][0], atol=1e-5, rtol=1e-4)


def test_packed_logprobs_under_gradient_checkpointing_match_and_skip_padding(monkeypatch):
    """The layout reaches a checkpointed layer's recomputation (same gradient), and the packed pass asks for logits
    only where a response token is predicted: one per distinct prompt plus one per other response token."""
    tok, model = tiny()
    exp = grouped_experience(tok)
    model.train()
    enable_packing(model)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()  # non-reentrant, transformers 5.x
        model.zero_grad()
        (response_logprobs(model, exp)[0] * exp.action_mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, forward=model.forward, **k: calls.append(k) or forward(*a, **k))
    response_logprobs(model, exp)
    assert len(calls) == 1 and calls[0]["input_ids"].shape[1] == 4 + 2 + int(exp.action_mask.sum())
    assert len(calls[0]["logits_to_keep"]) == 2 + int(exp.action_mask.sum()) - len(exp)


def test_rows_without_a_shared_prompt_take_the_single_forward(monkeypatch):
    tok, model = tiny()
    exp = build_experience([[10, 11], [12, 13]], [[20, 21], [22]], tok.pad_token_id, tok.eos_token_id, 4)
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, forward=model.forward, **k: calls.append(k) or forward(*a, **k))
    response_logprobs(model, exp, shared_prefix=True)
    assert len(calls) == 1 and calls[0]["use_cache"] is False


def small_hf(arch):
    """A 2-layer Qwen2 (grouped-query attention) or GPT-2 (absolute positions) over the char tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    if arch == "qwen2":
        return tok, Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                 max_position_embeddings=64))
    return tok, GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
