"""Alignment by hand: reward model, PPO, DPO and GRPO (issue 8).

The losses, estimators and controllers here are plain functions on tensors, so each can
be read (and tested) beside its equation without a model in sight.
"""

from .dpo import DPO_LOSS_TYPES, dpo_loss, sequence_logps
from .grpo import arithmetic_reward, group_advantages, grpo_loss
from .ppo import (
    AdaptiveKLController,
    FixedKLController,
    collapse_stats,
    collapse_warnings,
    compute_gae,
    entropy_from_logits,
    kl_penalty_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    repetition_rate,
)
from .reward import RewardModel, gather_last, last_token_index, pairwise_loss, reward_accuracy

__all__ = [
    "RewardModel",
    "pairwise_loss",
    "reward_accuracy",
    "last_token_index",
    "gather_last",
    "logprobs_from_logits",
    "entropy_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_penalty_rewards",
    "compute_gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "AdaptiveKLController",
    "FixedKLController",
    "repetition_rate",
    "collapse_stats",
    "collapse_warnings",
    "dpo_loss",
    "sequence_logps",
    "DPO_LOSS_TYPES",
    "group_advantages",
    "grpo_loss",
    "arithmetic_reward",
]
