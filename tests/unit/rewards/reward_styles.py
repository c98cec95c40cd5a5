"""Reward functions written the way TRL, veRL and OpenRLHF users write them, loaded by dotted path in
test_reward_adapters.py. Each records what it was called with in CALLS."""

import torch

CALLS: list[dict] = []


# TRL: batch call by keyword, dataset columns as **kwargs, completions may be chat messages.
def trl_contains_answer(prompts, completions, answer, **kwargs):
    CALLS.append({"prompts": prompts, "completions": completions, "answer": answer, "kwargs": kwargs})
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if str(a) in t else 0.0 for t, a in zip(texts, answer)]


def trl_no_kwargs(completions):
    CALLS.append({"completions": completions})
    return [float(len(c)) for c in completions]


def trl_needs_trainer_state(prompts, completions, trainer_state, **kwargs):
    return [0.0] * len(completions)


def trl_optional_trainer_state(prompts, completions, trainer_state=None, **kwargs):
    CALLS.append({"trainer_state": trainer_state})
    return [0.0] * len(completions)


async def trl_async(prompts, completions, **kwargs):
    return [0.5] * len(completions)


# veRL: one sample per call, by keyword; a float or a dict with "score".
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    CALLS.append({"data_source": data_source, "solution_str": solution_str, "ground_truth": ground_truth,
                  "extra_info": extra_info})
    return 1.0 if solution_str.strip().endswith(str(ground_truth)) else 0.0


def compute_score_dict(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 2.0 if str(ground_truth) in solution_str else -1.0, "acc": True}


def compute_score_no_score_key(data_source, solution_str, ground_truth, extra_info=None):
    return {"reward": 1.0}


def gsm8k_style(solution_str, ground_truth, method="strict"):  # veRL's built-in scorers take no data_source
    return 1.0 if str(ground_truth) in solution_str else 0.0


def per_sample(prompts, completions, **kwargs):  # a mistake: one number, not one per completion
    return 1.0


# OpenRLHF: one batch call, positional (queries = prompt + response, labels = the label column).
def reward_func(queries, prompts, labels):
    CALLS.append({"queries": queries, "prompts": prompts, "labels": labels})
    return torch.tensor([1.0 if q.endswith(str(l)) else 0.0 for q, l in zip(queries, labels)])


def reward_func_dict(queries, prompts, labels, **kwargs):
    rewards = torch.tensor([float(len(q) - len(p)) for q, p in zip(queries, prompts)])
    return {"rewards": rewards, "scores": rewards.clamp(0, 1), "extra_logs": {"mean": rewards.mean()}}


def reward_func_list(queries, prompts, labels):
    return [0.25] * len(queries)


def reward_func_short(queries, prompts, labels):
    return torch.zeros(len(queries) - 1)


def reward_func_no_rewards_key(queries, prompts, labels):
    return {"scores": torch.zeros(len(queries))}


# Any call: shows which convention an explicit reward.api chose.
def anything(*args, **kwargs):
    CALLS.append({"args": args, "kwargs": kwargs})
    n = len(args[0]) if args else len(kwargs.get("completions", [kwargs.get("solution_str")]))
    return 0.0 if "solution_str" in kwargs else [0.0] * n
