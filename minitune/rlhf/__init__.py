"""Alignment by hand: reward model, PPO, DPO and GRPO (issue 8).

The losses, estimators and controllers here are plain functions on tensors, so each can
be read (and tested) beside its equation without a model in sight.
"""

from .dpo import DPO_LOSS_TYPES, dpo_loss, sequence_logps
from .grpo import GRPOConfig, arithmetic_problem, arithmetic_reward, group_advantages, grpo_loss, grpo_step, train_grpo
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
from .ppo_trainer import (
    PPOConfig,
    Rollout,
    ppo_step,
    reference_logprobs,
    response_logprobs,
    sample_rollout,
    score_responses,
    text_reward,
    train_ppo,
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
    "arithmetic_problem",
    "PPOConfig",
    "Rollout",
    "sample_rollout",
    "response_logprobs",
    "reference_logprobs",
    "score_responses",
    "text_reward",
    "ppo_step",
    "train_ppo",
    "GRPOConfig",
    "grpo_step",
    "train_grpo",
]
