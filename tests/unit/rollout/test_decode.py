"""The decode loop samples exactly what transformers' generate samples with the same logits processors."""

import pytest
import torch

from rlhf.data.tokenize import collate_prompts
from rlhf.rollout.generation import SamplingParams, _processors, generate, response_lengths, sample_seeds
from tests.unit.rollout.test_experience import tiny

PROMPTS = ("12+3=", "7+8=", "100+250=", "7+8=", "1+1=", "7+8=", "12+3=")  # repeats share one prefill


def reference(model, tok, prompts, params, seeds):
    """transformers' own generate, cut at each row's first EOS."""
    batch = collate_prompts(prompts, tok.pad_token_id)
    kwargs = {"do_sample": False}
    if seeds is not None:
        kwargs["logits_processor"] = _processors(params, seeds)
    out = model.generate(**batch, max_new_tokens=params.max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, **kwargs)[:, batch["input_ids"].shape[1]:]
    lengths, _ = response_lengths(out, tok.eos_token_id)
    return [row[:n].tolist() for row, n in zip(out, lengths)]


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12, greedy=True),
                                    SamplingParams(max_new_tokens=12, temperature=1.0),
                                    SamplingParams(max_new_tokens=12, temperature=0.7, top_k=5, top_p=0.9)],
                         ids=["greedy", "seeded", "seeded-top-k-top-p"])
def test_matches_transformers_generate(params):
    tok, model = tiny()
    model.eval()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    seeds = None if params.greedy else sample_seeds(0, range(len(prompts)), 1)
    ours = generate(model, prompts, tok.pad_token_id, tok.eos_token_id, params, 16, seeds=seeds)
    assert ours == reference(model, tok, prompts, params, seeds)
    assert all(0 < len(r) <= 12 for r in ours)


def test_stops_when_every_row_has_ended():
    tok, model = tiny()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    eos_first = SamplingParams(max_new_tokens=30, greedy=True)
    with torch.no_grad():  # make EOS the only choice: the loop must stop after one token, not run 30 steps
        model.lm_head.bias = torch.nn.Parameter(torch.full((model.config.vocab_size,), -1e4))
        model.lm_head.bias.data[tok.eos_token_id] = 1e4
    out = generate(model, [tok("1+1=")["input_ids"]] * 3, tok.pad_token_id, tok.eos_token_id, eos_first, 8)
    assert out == [[tok.eos_token_id]] * 3 and len(calls) == 1
