"""A weighted list of reward functions, with the reward contract checked on every call.

A reward function has TRL's signature `f(prompts, completions, **columns) -> list[float | None]`: one value
per completion; `None` means "does not apply to this sample" and is left out of that function's weighted
sum. Functions are named from the registry (`accuracy`, `format`, ...) or by dotted path `pkg.mod:func`; a
dotted-path function may be written for TRL, veRL or OpenRLHF (`api`, see rlhf.rewards.adapters).
"""

from __future__ import annotations

import importlib
import threading
from functools import partial
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from rlhf.errors import ConfigError, RewardError
from rlhf.rewards.adapters import RewardContractError, adapt, check_api
from rlhf.rewards.rules import REWARD_FUNCS


def resolve_reward_function(name: str, api: str = "auto") -> Callable:
    """A registered function as it is; a dotted-path one adapted from `api` (auto|trl|verl|openrlhf) to our call."""
    if ":" not in name:
        return REWARD_FUNCS.get(name)
    module_name, _, attr = name.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"reward function {name!r} cannot be loaded: {exc}") from None
    return adapt(func, api, name)


def call_with_time_limit(call: Callable[[], Any], seconds: float) -> Any:
    """call() in a daemon thread, waiting at most `seconds`: a hung function raises TimeoutError here, and its
    thread cannot keep the process from exiting."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="reward")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError
    if "error" in result:
        raise result["error"]
    return result["value"]


@dataclass
class RewardResult:
    total: list[float]  # weighted sum per completion
    per_function: dict[str, list[float | None]]
    all_none: int  # completions no function applied to (scored 0)
    errors: int = 0  # completions given reward.error_score because a function raised (reward.on_error=score)


class RewardSet:
    def __init__(self, names: Sequence[str], weights: Sequence[float] | None = None, on_error: str = "raise",
                 error_score: float = 0.0, time_limit_s: float = 60.0, api: str = "auto",
                 functions: Mapping[str, Callable] | None = None):
        """`functions` names objects built by the caller (the reward model, as `model`); they take precedence
        over the registry."""
        if not names:
            raise ConfigError("reward.funcs is empty: name at least one reward function")
        weights = list(weights) if weights else [1.0] * len(names)
        if len(weights) != len(names):
            raise ConfigError(f"reward.weights has {len(weights)} values for {len(names)} reward.funcs")
        if on_error not in ("raise", "score"):
            raise ConfigError(f"reward.on_error must be raise or score, got {on_error!r}")
        check_api(api)
        self.names = list(names)
        functions = dict(functions or {})
        self.funcs = [functions[n] if n in functions else resolve_reward_function(n, api) for n in names]
        self.weights = [float(w) for w in weights]
        self.on_error, self.error_score, self.time_limit_s = on_error, error_score, time_limit_s
        # The learned reward model, when the set has one (the function named `model`): it scores raw prompt rows in
        # its own training format, and the RL stages wrap it for ZeRO-3 and read its mean, std and weight.
        self.model = functions.get("model")
        self.model_weight = self.weights[self.names.index("model")] if self.model is not None else 0.0
        self.sandbox = None  # the code reward's sandbox, when the set runs code (from_config)
        self.errors = 0  # over the life of the set; each call's own count is in its RewardResult

    @classmethod
    def from_config(cls, r: Any, *, dtype: str = "fp32", batch_size: int = 16, device: Any = None) -> "RewardSet":
        """The weighted reward functions of a `reward.*` config; the name `model` is the reward model at
        reward.model_path (loaded here, scoring `batch_size` completions at a time), and `code` gets its sandbox's
        limits from reward.code."""
        functions = {}
        if "model" in r.funcs:
            if not r.model_path:
                raise ConfigError("reward.funcs names `model` but reward.model_path is not set: point it at the "
                                  "final/ directory of an `rlhf train-rm` run")
            from rlhf.rewards.model import RewardModel

            functions["model"] = RewardModel.from_pretrained(r.model_path, normalize=r.normalize, dtype=dtype,
                                                             device=device, batch_size=batch_size)
        elif r.model_path:
            raise ConfigError(f"reward.model_path={r.model_path} is set but reward.funcs={list(r.funcs)} does not "
                              "name `model`: add it (reward=model, or reward.funcs=[model,format])")
        rewards = cls(r.funcs, r.weights, r.on_error, r.error_score, r.time_limit_s, api=r.get("api", "auto"),
                      functions=functions)
        if "code" in r.funcs:
            from rlhf.rewards.code import configure_sandbox

            rewards.sandbox = configure_sandbox(timeout_s=r.code.timeout_s, memory_mb=r.code.memory_mb,
                                                max_procs=r.code.max_procs, max_workers=r.code.max_workers)
        return rewards

    def _call(self, name: str, func: Callable, prompts: list, completions: list,
              columns: Mapping[str, list], rows: Sequence[Mapping[str, Any]] | None) -> list[float | None]:
        # A reward model renders the raw prompt rows in its own training format, not the policy's rendered text.
        call = partial(func.score_completions, rows, completions) if rows is not None and func is self.model \
            else partial(func, prompts=prompts, completions=completions, **columns)
        try:
            values = call_with_time_limit(call, self.time_limit_s)
        except TimeoutError:
            # The call cannot be killed (it may hold the GIL in C code); it is abandoned and the run stops.
            raise RewardError(f"reward function {name!r} did not return within reward.time_limit_s="
                              f"{self.time_limit_s}s for {len(completions)} completions") from None
        except RewardContractError:  # an unreadable result is a bug in the function, not a bad sample
            raise
        except Exception as exc:  # a user's function: report which one and on what
            if self.on_error == "score":
                self.errors += len(completions)
                return [self.error_score] * len(completions)
            sample = completions[0] if len(completions) == 1 else f"one of {len(completions)} completions"
            raise RewardError(f"reward function {name!r} raised {type(exc).__name__}: {exc} "
                              f"(on {sample!r}; set reward.on_error=score to score such samples "
                              f"{self.error_score} instead)") from exc
        try:
            values = list(values) if values is not None else None
        except TypeError:  # e.g. one float: a per-sample function called as a batch one
            raise RewardError(f"reward function {name!r} returned a {type(values).__name__}, not a list of one "
                              f"value per completion (a per-sample veRL function? set reward.api=verl)") from None
        if values is None or len(values) != len(completions):
            raise RewardError(f"reward function {name!r} returned {'None' if values is None else len(values)} "
                              f"values for {len(completions)} completions (one per completion, None for "
                              "'does not apply')")
        out: list[float | None] = []
        for i, v in enumerate(values):
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(float(v))):
                raise RewardError(f"reward function {name!r} returned {v!r} for completion {i} "
                                  f"({completions[i]!r}): expected a finite number or None")
            out.append(None if v is None else float(v))
        return out

    def __call__(self, prompts: list, completions: list, columns: Mapping[str, list[Any]],
                 rows: Sequence[Mapping[str, Any]] | None = None) -> RewardResult:
        """Score completions; `rows` (the raw prompt rows) are what a reward model scores from."""
        errors_before = self.errors
        per_function = {n: self._call(n, f, prompts, completions, columns, rows)
                        for n, f in zip(self.names, self.funcs)}
        total, all_none = [], 0
        for i in range(len(completions)):
            applied = [(w, per_function[n][i]) for n, w in zip(self.names, self.weights)
                       if per_function[n][i] is not None]
            all_none += not applied
            total.append(sum(w * v for w, v in applied))
        return RewardResult(total, per_function, all_none, self.errors - errors_before)
