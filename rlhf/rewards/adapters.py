"""Reward functions written for TRL, veRL or OpenRLHF, called as ours: `f(prompts, completions, **columns) -> list`.

- trl: TRL GRPOTrainer's `f(prompts, completions, completion_ids, trainer_state, **columns)`, by keyword. We have
  neither token ids nor a transformers TrainerState, so a function that requires either is refused up front.
- verl: veRL's `compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict`, by keyword,
  once per completion; a dict carries the score under "score".
- openrlhf: OpenRLHF's `reward_func(queries, prompts, labels)`, positionally, once per batch; returns a tensor, a
  list, or a dict whose "rewards" are used.
- auto: verl when the function names `solution_str` and `ground_truth`, openrlhf when it names `queries`, `prompts`
  and `labels`, otherwise (or when both match) trl.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable, Mapping, Optional

from rlhf.errors import ConfigError, RewardError
from rlhf.rewards.rules import completion_text

APIS = ("auto", "trl", "verl", "openrlhf")
# TRL passes these; rlhf's reward call has no token ids and no transformers TrainerState to give.
TRL_ONLY_ARGS = ("completion_ids", "trainer_state")
# Where veRL's ground truth is looked for in a row, first present and not None wins: veRL's own flat column, veRL's
# parquet layout (reward_model={"ground_truth": ...}), then the columns rlhf's and TRL's datasets use.
GROUND_TRUTH_COLUMNS = ("ground_truth", "reward_model", "answer", "solution")
VERL_DATA_SOURCE = "rlhf"  # data_source when the data has no `data_source` column
# veRL passes these columns as arguments of their own, never inside extra_info.
_VERL_OWN_COLUMNS = frozenset({"data_source", "ground_truth", "reward_model", "extra_info"})


class RewardContractError(RewardError):
    """A result the adapter cannot read (no "score" / "rewards" key): a bug in the function, raised whatever
    reward.on_error says, like the other contract checks."""


def check_api(api: str) -> None:
    if api not in APIS:
        raise ConfigError(f"reward.api must be one of {', '.join(APIS)}; got {api!r}")


def _signature(func: Callable) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):  # some builtins and C callables have none
        return None


def _accepted(sig: Optional[inspect.Signature]) -> Optional[set[str]]:
    """Keyword names the function takes; None when it takes any (**kwargs) or we cannot tell."""
    if sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _only(kwargs: dict[str, Any], accepted: Optional[set[str]]) -> dict[str, Any]:
    # Lenient where the frameworks are strict: a function without **kwargs gets just the arguments it names.
    return kwargs if accepted is None else {k: v for k, v in kwargs.items() if k in accepted}


def _awaited(result: Any) -> Any:
    # TRL also accepts `async def` reward functions; the trainer runs no event loop of its own here.
    return asyncio.run(result) if inspect.iscoroutine(result) else result


def detect_api(func: Callable) -> str:
    sig = _signature(func)
    names = set(sig.parameters) if sig is not None else set()
    verl = {"solution_str", "ground_truth"} <= names
    openrlhf = {"queries", "prompts", "labels"} <= names
    if verl != openrlhf:
        return "verl" if verl else "openrlhf"
    return "trl"


def adapt(func: Callable, api: str, name: str) -> Callable:
    """`func` as a TRL-style batch function; `name` (as in reward.funcs) is used in error messages."""
    check_api(api)
    chosen = detect_api(func) if api == "auto" else api
    return {"trl": _trl, "verl": _verl, "openrlhf": _openrlhf}[chosen](func, name)


def _trl(func: Callable, name: str) -> Callable:
    sig = _signature(func)
    for arg in TRL_ONLY_ARGS:
        p = sig.parameters.get(arg) if sig is not None else None
        if p is not None and p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ConfigError(f"reward function {name!r} requires `{arg}`, which TRL passes but rlhf cannot "
                              f"(it passes prompts, completions and the data's columns): give `{arg}` a default "
                              "or drop it")
    accepted = _accepted(sig)
    if accepted is None and not inspect.iscoroutinefunction(func):
        return func  # already our call

    def call(prompts: list, completions: list, **columns: Any) -> Any:
        return _awaited(func(**_only({"prompts": prompts, "completions": completions, **columns}, accepted)))

    return call


def _rows(columns: Mapping[str, list], n: int) -> list[dict[str, Any]]:
    for key, values in columns.items():
        if len(values) != n:
            raise RewardError(f"column {key!r} has {len(values)} values for {n} completions")
    return [{key: values[i] for key, values in columns.items()} for i in range(n)]


def verl_ground_truth(row: Mapping[str, Any]) -> Any:
    """The row's ground truth, looked for in GROUND_TRUTH_COLUMNS order; None when there is none."""
    for key in GROUND_TRUTH_COLUMNS:
        value = row.get(key)
        if key == "reward_model":
            value = value.get("ground_truth") if isinstance(value, Mapping) else None
        if value is not None:
            return value
    return None


def _verl(func: Callable, name: str) -> Callable:
    accepted = _accepted(_signature(func))

    def call(prompts: list, completions: list, **columns: Any) -> list:
        scores = []
        for i, (completion, row) in enumerate(zip(completions, _rows(columns, len(completions)))):
            extra = {k: v for k, v in row.items() if k not in _VERL_OWN_COLUMNS}
            if isinstance(row.get("extra_info"), Mapping):  # a veRL dataset's own extra_info wins
                extra.update(row["extra_info"])
            kwargs = {"data_source": row.get("data_source") or VERL_DATA_SOURCE,
                      "solution_str": completion_text(completion, i),
                      "ground_truth": verl_ground_truth(row), "extra_info": extra}
            score = _awaited(func(**_only(kwargs, accepted)))
            if isinstance(score, Mapping):
                if "score" not in score:
                    raise RewardContractError(
                        f"reward function {name!r} (veRL style) returned a dict without 'score' for completion "
                        f"{i}: keys {sorted(map(str, score))}")
                score = score["score"]
            scores.append(score)
        return scores

    return call


def _openrlhf(func: Callable, name: str) -> Callable:
    def call(prompts: list, completions: list, **columns: Any) -> Any:
        n = len(completions)
        prompt_texts = [completion_text(p, i) for i, p in enumerate(prompts)]
        responses = [completion_text(c, i) for i, c in enumerate(completions)]
        # OpenRLHF's --label_key column: `answer` (rlhf's and gsm8k's) when the data has one, else `label`.
        labels = list(columns.get("answer", columns.get("label", [None] * n)))
        result = _awaited(func([p + r for p, r in zip(prompt_texts, responses)], prompt_texts, labels))
        if isinstance(result, Mapping):
            if "rewards" not in result:
                raise RewardContractError(f"reward function {name!r} (OpenRLHF style) returned a dict without "
                                          f"'rewards': keys {sorted(map(str, result))}")
            result = result["rewards"]
        return result.tolist() if hasattr(result, "tolist") else result  # torch tensor or numpy array

    return call
