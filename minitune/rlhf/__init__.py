"""Alignment by hand: reward model, PPO, DPO and GRPO (issue 8).

The losses, estimators and controllers here are plain functions on tensors, so each can
be read (and tested) beside its equation without a model in sight.
"""

from .dpo import (DPO_LOSS_TYPES, add_reference_logps, dpo_loss, dpo_loss_fn, policy_logps, response_kl,
                  sequence_logps, train_dpo)
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
from .reward import (PairCollator, PairData, PairReport, RewardModel, gather_last, last_token_index,
                     load_reward_model, pairwise_loss, prepare_pairs, reward_accuracy, reward_loss_fn,
                     save_reward_model, score_pairs, stack_pairs, train_reward_model)
