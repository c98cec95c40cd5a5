"""`rollout.engine=vllm`: the RL rollouts sampled by a vLLM engine inside each training process, on its GPU.

The engine is colocated (as TRL's `vllm_mode=colocate` and veRL's hybrid engine): it is built from the policy's
config and tokenizer with dummy weights, and the policy's current weights are loaded into it before every rollout
that follows an update, so every response comes from the policy being trained. vLLM is imported when the engine is
built, never before: a machine without it (or without a GPU) runs the default `rollout.engine=hf` untouched. Which
device vLLM runs on is vLLM's choice (its CUDA build on the process's GPU).

The sampling contract is the HF engine's (rlhf.rollout.generation.generate): prompts in as token ids, one response
per prompt out as token ids, ending at (and keeping) its first EOS, at rollout.temperature / top_p / top_k and at
most rollout.max_new_tokens tokens; with rollout.seeded each response is drawn from its own seed (the same seeds as
the HF engine's, so a response does not depend on batch size or process count, but vLLM's sampler turns a seed into
other tokens than ours). The update recomputes every log-prob with the training model, as with the HF engine.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterator, Sequence

import torch

from rlhf.errors import ConfigError
from rlhf.rollout.generation import SamplingParams


def policy_weights(engine) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the policy's weights as a plain Hugging Face checkpoint names them: LoRA adapters folded in,
    ZeRO-3 shards gathered one parameter at a time (every rank gets the full tensor)."""
    from rlhf.engine.engine import zero_stage
    from rlhf.models.lora import adapter_of, merged_state_dict

    if adapter_of(engine) is not None:
        yield from merged_state_dict(engine.module).items()
        return
    if zero_stage(engine) == 3:
        import deepspeed

        for name, param in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.detach()
        return
    for name, tensor in engine.module.state_dict().items():
        yield name, tensor.detach()


def _load_weights(worker, weights) -> None:
    worker.model_runner.model.load_weights(weights)


class VLLMRollout:
    """A vLLM engine for one training process; `generate` samples as rlhf.rollout.generation.generate does."""

    def __init__(self, model: torch.nn.Module, tokenizer, cfg: Any, seed: int, max_prompt_length: int):
        try:
            import vllm
            from vllm.inputs import TokensPrompt
        except ImportError as err:
            raise ConfigError("rollout.engine=vllm needs vLLM: pip install 'rlhf[vllm]' "
                              f"(import failed: {err}); or use rollout.engine=hf") from err
        self.vllm, self.tokens_prompt = vllm, TokensPrompt
        self.eos_id = tokenizer.eos_token_id
        # The in-process engine, so the weights can be handed over by reference (no copy through another process).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._dir = tempfile.TemporaryDirectory(prefix="rlhf-vllm-")
        getattr(model, "module", model).config.save_pretrained(self._dir.name)
        tokenizer.save_pretrained(self._dir.name)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.llm = vllm.LLM(
            model=self._dir.name, load_format="dummy", seed=seed,
            dtype=str(getattr(model, "dtype", torch.float32)).removeprefix("torch."),
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            max_model_len=max_prompt_length + cfg.max_new_tokens, enable_prefix_caching=True,
            # Each rank runs its own engine on its own GPU and its own share of the prompts.
            **({"distributed_executor_backend": "external_launcher"} if world > 1 else {}))
        self.synced_step: int | None = None

    def sync(self, engine, step: int) -> None:
        """Load the policy's weights into vLLM unless they were loaded at this optimizer step already."""
        if self.synced_step == step:
            return
        weights = list(policy_weights(engine))
        self.llm.collective_rpc(_load_weights, args=(weights,))
        if hasattr(self.llm, "reset_prefix_cache"):  # cached prompt keys/values came from the old weights
            self.llm.reset_prefix_cache()
        self.synced_step = step

    def sampling_params(self, params: SamplingParams, seed: int | None):
        return self.vllm.SamplingParams(
            n=1, max_tokens=params.max_new_tokens, temperature=0.0 if params.argmax else params.temperature,
            top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else -1, seed=seed,
            stop_token_ids=[] if self.eos_id is None else [self.eos_id], detokenize=False)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[int]]:
        requests = [self.tokens_prompt(prompt_token_ids=list(p)) for p in prompts]
        sampling = [self.sampling_params(params, None if seeds is None else seeds[i]) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return [self._response(out.outputs[0]) for out in outputs]

    def _response(self, completion) -> list[int]:
        ids = list(completion.token_ids)
        if self.eos_id is None:
            return ids
        if self.eos_id in ids:
            return ids[:ids.index(self.eos_id) + 1]
        if completion.finish_reason == "stop":  # stopped on EOS without returning it
            ids.append(self.eos_id)
        return ids
