"""A stand-in for vLLM's offline API, put on PYTHONPATH by the tests of rollout.engine=vllm (no GPU, no vLLM here).

`LLM` builds the model from the config directory with random weights (load_format="dummy"), takes weights through
`collective_rpc(fn, args)` -> fn(worker, *args) with `worker.model_runner.model.load_weights(iterable)`, and samples
with rlhf's own decoder from each request's seed: so a run whose weights are synced after every update samples
exactly what rollout.engine=hf samples. Every weight load is recorded (LOADS) for the tests to read.
"""

from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from vllm import inputs  # noqa: F401  (vllm.inputs.TokensPrompt, as vLLM imports it)

LOADS: list[dict] = []


class SamplingParams:
    def __init__(self, n=1, max_tokens=16, temperature=1.0, top_p=1.0, top_k=-1, seed=None, stop_token_ids=None,
                 detokenize=True):
        assert n == 1
        self.max_tokens, self.temperature, self.top_p, self.top_k, self.seed = max_tokens, temperature, top_p, top_k, seed
        self.stop_token_ids, self.detokenize = stop_token_ids or [], detokenize


class _Model:
    def __init__(self, hf):
        self.hf = hf

    def load_weights(self, weights):
        state = {name: tensor.detach().clone() for name, tensor in weights}
        missing = set(self.hf.state_dict()) - set(state)
        assert not missing, f"weights missing: {sorted(missing)[:5]}"
        self.hf.load_state_dict(state)
        LOADS.append(state)
        print(f"fake vllm: weights loaded ({len(state)} tensors)", flush=True)


class LLM:
    def __init__(self, model, load_format="auto", seed=0, dtype="auto", gpu_memory_utilization=0.9, max_model_len=None,
                 enable_prefix_caching=False, **kwargs):
        assert load_format == "dummy"
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = _Model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).eval())
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=self.model))
        self.max_model_len = max_model_len

    def collective_rpc(self, method, args=()):
        return [method(self.worker, *args)]

    def reset_prefix_cache(self):
        return True

    def generate(self, prompts, sampling_params, use_tqdm=True):
        from rlhf.rollout.generation import SamplingParams as Ours, generate

        first = sampling_params[0]
        params = Ours(first.max_tokens, first.temperature, first.top_p, max(first.top_k, 0), greedy=first.temperature == 0)
        seeds = [sp.seed for sp in sampling_params]
        ids = [p["prompt_token_ids"] for p in prompts]
        eos = first.stop_token_ids[0] if first.stop_token_ids else None
        out = generate(self.model.hf, ids, self.tokenizer.pad_token_id, eos, params, 256,
                       seeds=None if seeds[0] is None else seeds)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=tuple(r), finish_reason="stop" if r and r[-1] == eos
                                                         else "length")]) for r in out]
