"""Alignment by hand: reward model, PPO, DPO and GRPO (issue 8).

The losses, estimators and controllers here are plain functions on tensors, so each can
be read (and tested) beside its equation without a model in sight.

    pairs.py        preference pairs -> token ids, bad pairs counted (RM and DPO)
    reward.py       the reward model and its pairwise loss (lesson 10)
    ppo.py          PPO's math: log-probs, masked statistics, KL-penalised rewards, GAE, losses (lesson 11)
    rollout.py      sampling responses and scoring them (PPO and GRPO)
    collapse.py     the collapse watch: response length and repetition, warnings
    ppo_trainer.py  the PPO loop with its four models (lesson 11)
    rl_checkpoint.py  PPO / GRPO checkpoints: resuming reproduces the uninterrupted run
    sharded.py      PPO / GRPO on W processes: each rank rolls out its share, the models sharded (lesson 14)
    dpo.py          DPO and its variants: sigmoid (+ label smoothing), IPO, hinge, pref_ftx (lesson 12)
    orpo.py         ORPO: SFT + odds ratio, no reference model
    simpo.py        SimPO: length-averaged reward with a margin, no reference model
    kto.py          KTO: unpaired desirable / undesirable replies against a KL reference point
    grpo.py         GRPO with a rule-checked reward (lesson 13)
"""

from .collapse import collapse_stats, collapse_warnings, repetition_rate
from .dpo import (DPO_LOSS_TYPES, add_reference_logps, dpo_loss, dpo_loss_fn, pair_lengths, policy_logps, response_kl,
                  sequence_logps, sft_term, train_dpo)
from .kto import add_kto_reference_logps, kto_logps, kto_loss, kto_loss_fn, train_kto
from .orpo import log1mexp, orpo_loss, orpo_loss_fn, train_orpo
from .simpo import simpo_loss, simpo_loss_fn, train_simpo
from .grpo import GRPOConfig, arithmetic_problem, arithmetic_reward, group_advantages, grpo_loss, grpo_step, train_grpo
from .pairs import PairCollator, PairData, PairReport, prepare_pairs, stack_pairs
from .logprobs import entropy_from_logits, logprobs_from_logits, masked_mean
from .ppo import (AdaptiveKLController, FixedKLController, compute_gae, kl_penalty_rewards, masked_var, masked_whiten,
                  ppo_policy_loss, ppo_value_loss)
from .ppo_trainer import PPOConfig, critic_values, ppo_step, train_ppo
from .rl_checkpoint import load_rl_checkpoint, resume_rl, save_rl_checkpoint
from .reward import (RewardModel, gather_last, last_token_index, load_reward_model, pairwise_loss, reward_accuracy,
                     reward_loss_fn, save_reward_model, score_pairs, train_reward_model)
from .rollout import (Rollout, reference_logprobs, response_logprobs, sample_rollout, score_responses, text_reward,
                      user_message)
