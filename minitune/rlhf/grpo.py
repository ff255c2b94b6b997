"""GRPO: Group Relative Policy Optimization, the math.

GRPO (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
Open Language Models", section 4.1) drops PPO's critic.  For each prompt it samples a
group of G responses, scores them (here with a rule: is the arithmetic right?), and uses
the group itself as the baseline:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)      same A_i for every token of o_i

The loss is PPO's clipped surrogate plus a KL penalty to the reference, estimated per
token with Schulman's k3 estimator (http://joschu.net/blog/kl-approx.html), which is
unbiased and always >= 0:

    k3_t   = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1
    l_t    = -min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i) + beta * k3_t
    loss   = mean_i [ (1/|o_i|) sum_t l_t ]

Normalisation: as in the paper, each sequence's tokens are averaged first (1/|o_i|), then
sequences are averaged, so every response weighs the same whatever its length.  (Later
work, e.g. DAPO, averages over all tokens of the batch instead; not done here.)
"""

from __future__ import annotations

import re

import torch

from .ppo import masked_mean

__all__ = ["group_advantages", "grpo_loss", "arithmetic_reward"]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages: [B] rewards, B = n_prompts * group_size -> [B].

    Rewards must be laid out group by group (the G samples of prompt 0, then of prompt 1...).
    std is the unbiased sample std (torch's default, as trl's GRPOTrainer uses).  A group
    where every sample got the same reward has std 0 and advantage 0: nothing to learn.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be [n_prompts * group_size], got {tuple(rewards.shape)} with group_size {group_size}")
    # BEGIN EXERCISE 13.1: group-normalised advantages
    grouped = rewards.view(-1, group_size).to(torch.float32)  # [n_prompts, G]
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)
    # END EXERCISE


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, mean_kl, clip_frac).

    logp, old_logp, ref_logp, mask: [B, T] over response tokens; advantages: [B] (one per
    response).  mean_kl and clip_frac are detached token means over real tokens, for logging.
    """
    # BEGIN EXERCISE 13.2: the GRPO loss
    mask_f = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # [B, 1]: broadcast to every token
    ratio = torch.exp(logp - old_logp)  # [B, T]
    surr_unclipped = ratio * adv
    surr_clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * adv
    policy_term = -torch.min(surr_unclipped, surr_clipped)

    log_ratio_ref = ref_logp - logp
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1  # [B, T] k3 >= 0

    per_token = policy_term + beta * kl
    # Sequence-level mean: (1/|o_i|) sum_t, then the mean over responses.
    per_seq = (per_token * mask_f).sum(dim=1) / mask_f.sum(dim=1).clamp(min=1)  # [B]
    loss = per_seq.mean()
    with torch.no_grad():
        mean_kl = masked_mean(kl, mask_f)
        clip_frac = masked_mean((surr_clipped < surr_unclipped).to(logp.dtype), mask_f)
    return loss, mean_kl, clip_frac
    # END EXERCISE


_PROBLEM = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=")
_NUMBER = re.compile(r"-?\d+")


def arithmetic_reward(prompt: str, response: str) -> float:
    """Rule-checked reward: 1.0 if the first integer in the response is the answer, else 0.0.

    The problem is the last "a op b =" in the prompt (op one of + - *), so a chat template
    or instructions before it do not matter.  No number in the response -> 0.0.
    A rule, not a learned RM: it cannot be reward-hacked, which is why GRPO-style training
    on checkable tasks (maths, code) works so well.
    """
    problems = _PROBLEM.findall(prompt)
    if not problems:
        raise ValueError(f"no 'a+b=' style problem found in prompt {prompt!r}")
    a, op, b = problems[-1]
    a, b = int(a), int(b)
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    found = _NUMBER.search(response)
    return 1.0 if found is not None and int(found.group()) == answer else 0.0
