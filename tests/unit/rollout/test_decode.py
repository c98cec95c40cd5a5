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


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=16, temperature=1.0),
                                    SamplingParams(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.95)],
                         ids=["seeded", "seeded-top-k-top-p"])
def test_rows_that_have_ended_leave_the_batch_and_the_samples_stay_the_same(params):
    """Once a quarter of the batch has ended, the ended rows stop running (fewer rows per decode step), and every
    row still gets what transformers' generate gives it: its seeded noise follows it out of the batch."""
    tok, model = tiny()
    model.eval()
    with torch.no_grad():  # EOS about as likely as the next best token: rows end at many different steps
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias.data[tok.eos_token_id] = 2.0
    prompts = [tok(f"{a}+{b}=")["input_ids"] for a, b in ((12, 3), (7, 8), (100, 250), (1, 1), (45, 45), (9, 99))] * 3
    seeds = sample_seeds(0, range(len(prompts)), 1)
    rows = []
    hook = model.register_forward_hook(lambda _, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    ours = generate(model, prompts, tok.pad_token_id, tok.eos_token_id, params, len(prompts), seeds=seeds)
    hook.remove()
    lengths = {len(r) for r in ours}
    assert len(lengths) > 2  # rows did end at different steps
    assert min(rows[1:]) < len(prompts)  # and the batch shrank as they did
    assert ours == reference(model, tok, prompts, params, seeds)



@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_samples_what_generate_samples_on_other_layouts(arch):
    """Grouped-query attention (Qwen2) and absolute positions (GPT-2) decode as transformers' generate does."""
    from tests.unit.rollout.test_experience import small_hf

    tok, model = small_hf(arch)
    model.eval()
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    seeds = sample_seeds(0, range(len(prompts)), 1)
    assert generate(model, prompts, tok.pad_token_id, tok.eos_token_id, params, 16, seeds=seeds) == \
        reference(model, tok, prompts, params, seeds)
