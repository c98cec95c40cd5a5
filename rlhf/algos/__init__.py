"""Pure tensor math for RLHF: losses, advantages, KL, aggregations. No I/O, no models, no config objects.

Each function takes tensors (and masks of the same shape, 1 for real tokens) and returns tensors; its docstring
gives the formula and its source. docs/algorithms.md lists them all.
"""

from rlhf.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    gae,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from rlhf.algos.aggregation import (
    LOSS_AGGREGATIONS,
    aggregate,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    whiten,
)
from rlhf.algos.dpo import DPO_LOSSES, implicit_rewards, preference_metrics, simpo_loss
from rlhf.algos.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty
from rlhf.algos.logprobs import entropy_from_logits, token_logprobs
from rlhf.algos.policy import clipped_policy_loss, clipped_value_loss
from rlhf.algos.reward_model import (
    RM_LOSSES,
    bradley_terry_loss,
    centering_loss,
    dense_scores,
    last_token_index,
    listwise_loss,
    pairwise_accuracy,
    pairwise_ranking_loss,
    ranking_accuracy,
    ranking_centering_loss,
)
from rlhf.algos.reward_shaping import cut_response_scores, kl_shaped_rewards, place_sequence_rewards
from rlhf.algos.sft import sft_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "DPO_LOSSES",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "RM_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate",
    "bradley_terry_loss",
    "centering_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "cut_response_scores",
    "dense_scores",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "implicit_rewards",
    "kl_penalty",
    "kl_shaped_rewards",
    "last_token_index",
    "listwise_loss",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_accuracy",
    "pairwise_ranking_loss",
    "place_sequence_rewards",
    "preference_metrics",
    "ranking_accuracy",
    "ranking_centering_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sft_loss",
    "simpo_loss",
    "token_logprobs",
    "whiten",
    "zero_variance_groups",
]
