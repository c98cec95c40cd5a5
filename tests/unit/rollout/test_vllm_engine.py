"""rollout.engine=vllm without vLLM installed: nothing imports it unless asked, a clear error when asked, and the
sampling contract (parameters, responses cut at their first EOS) against the stand-in in tests/fake_vllm."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from rlhf.config import RolloutConfig, TinyModelConfig
from rlhf.errors import ConfigError
from rlhf.models.tiny import build_tiny_model
from rlhf.models.tokenizer import build_char_tokenizer
from rlhf.rollout.generation import SamplingParams
from rlhf.rollout.vllm_engine import VLLMRollout, policy_weights

FAKE = Path(__file__).resolve().parents[2] / "fake_vllm"
TOK = build_char_tokenizer()


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE))
    yield
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


def rollout(**kw) -> VLLMRollout:
    cfg = OmegaConf.structured(RolloutConfig(**kw))
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), TOK, 0)
    return VLLMRollout(model, TOK, cfg, seed=0, max_prompt_length=16)


def test_no_module_imports_vllm_unless_the_engine_is_asked_for():
    code = "import sys, rlhf.cli, rlhf.trainers.grpo, rlhf.trainers.ppo; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": f"{FAKE}:{Path(__file__).resolve().parents[3]}", "DS_ACCELERATOR": "cpu"})
    assert out.stdout.strip() == "False"


def test_asking_for_vllm_without_it_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ConfigError, match=r"rollout.engine=vllm needs vLLM: pip install 'rlhf\[vllm\]'"):
        rollout()


def test_sampling_parameters_follow_the_run(fake_vllm):
    engine = rollout()
    sampled = engine.sampling_params(SamplingParams(20, temperature=0.7, top_p=0.9, top_k=0), seed=123)
    assert (sampled.max_tokens, sampled.temperature, sampled.top_p, sampled.top_k, sampled.seed) == (20, 0.7, 0.9, -1, 123)
    assert sampled.stop_token_ids == [TOK.eos_token_id] and sampled.detokenize is False
    greedy = engine.sampling_params(SamplingParams(5, greedy=True, top_k=4), seed=None)
    assert (greedy.temperature, greedy.top_k, greedy.seed) == (0.0, 4, None)


def test_a_response_ends_at_and_keeps_its_first_eos(fake_vllm):
    engine, eos = rollout(), TOK.eos_token_id
    done = lambda ids, reason: engine._response(SimpleNamespace(token_ids=tuple(ids), finish_reason=reason))
    assert done([5, 6, eos, 7], "stop") == [5, 6, eos]
    assert done([5, 6], "stop") == [5, 6, eos]  # stopped on EOS without returning it
    assert done([5, 6], "length") == [5, 6]  # truncated: no EOS


def test_weights_reach_the_engine_and_sampling_then_matches_the_policy(fake_vllm):
    engine = rollout(max_new_tokens=8)
    policy = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), TOK, 7)
    holder = SimpleNamespace(module=policy)
    engine.sync(holder, step=0)
    engine.sync(holder, step=0)  # already loaded at this step: no second load
    import vllm

    assert len(vllm.LOADS) == 1
    assert all(torch.equal(vllm.LOADS[0][k], v) for k, v in policy_weights(holder))
    from rlhf.rollout.generation import generate

    prompts, params, seeds = [[10, 11, 12], [13, 14]], SamplingParams(8), [1, 2]
    assert engine.generate(prompts, params, seeds) == generate(policy, prompts, TOK.pad_token_id, TOK.eos_token_id,
                                                               params, 8, seeds=seeds)
