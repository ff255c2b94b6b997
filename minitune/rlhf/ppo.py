"""PPO for RLHF: the math, as plain functions on tensors.

InstructGPT (Ouyang et al. 2022) fine-tunes the SFT policy pi with PPO (Schulman et al.
2017, "Proximal Policy Optimization Algorithms") to maximise the reward model's score
while a per-token KL penalty keeps it near the frozen reference pi_ref (the SFT model):

    r_t = -kl_coef * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))     every response token
    r_T += RM(prompt, response)                                  last response token

Advantages come from GAE (Schulman et al. 2016, "High-Dimensional Continuous Control
Using Generalized Advantage Estimation") with the critic's values V_t:

    delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last token = 0: terminal)
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t                            (the critic's regression target)

The policy loss is the clipped surrogate, with rho_t = pi(a_t|s_t) / pi_old(a_t|s_t):

    L_pi = mean_t max( -A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps) )

and the value loss is clipped the same way around the rollout's values (as in the
InstructGPT-era implementations: OpenAI lm-human-preferences, trl):

    L_V = 0.5 * mean_t max( (V_t - R_t)^2, (V_old + clip(V_t - V_old, -c, c) - R_t)^2 )

All means run over real response tokens only (``mask`` = 1), never over padding.
Shapes: B = batch of responses, T = response length (padded), V = vocabulary.
"""

from __future__ import annotations

import torch

from .logprobs import entropy_from_logits, logprobs_from_logits, masked_mean  # noqa: F401 (re-exported)
from .reward import last_token_index

__all__ = [
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
]


# ---------------------------------------------------------------------------
# Masked statistics (masked_mean lives in logprobs.py, shared with GRPO)
# ---------------------------------------------------------------------------


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over real tokens; unbiased (Bessel's n/(n-1)) by default, as trl does."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"unbiased variance needs at least 2 real tokens, mask has {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over real tokens; padding positions come out as 0.

    Whitening advantages makes the policy step size independent of the reward scale.
    ``shift_mean=False`` only rescales (trl does this for rewards: keeps their sign).
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


# ---------------------------------------------------------------------------
# Rewards and GAE
# ---------------------------------------------------------------------------


def kl_penalty_rewards(
    logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token reward: -kl_coef * (logp - ref_logp), plus the RM score at the last real token.

    logp, ref_logp, mask: [B, T] over response tokens; scores: [B].  Returns [B, T], 0 on padding.
    log pi - log pi_ref is the single-sample (k1) estimate of KL(pi || pi_ref); summed over
    the response it is the sequence KL that keeps the policy from drifting into reward hacking.
    """
    mask_f = mask.to(logp.dtype)
    rewards = -kl_coef * (logp - ref_logp) * mask_f  # [B, T]
    last = last_token_index(mask)  # [B]; raises on an empty response: no token to pay
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.device, rewards.dtype)
    return rewards


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over response tokens: -> (advantages, returns), each [B, T].

    rewards, values, mask: [B, T]; mask marks real response tokens (right padding).
    Read backwards from the end: the state after the last real token is terminal, so its
    value is 0 and nothing flows back from padding.  returns = advantages + values.
    Padding positions are 0 in both outputs.  No gradient: these are targets.
    """
    # BEGIN EXERCISE 11.1: generalized advantage estimation (GAE)
    mask_f = mask.to(values.dtype)
    B, T = values.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)  # V_{t+1}
    next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)  # A_{t+1}
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        adv = delta + gamma * lam * next_adv
        adv = adv * mask_f[:, t]  # padding: no advantage
        advantages[:, t] = adv
        # What step t-1 sees as "next": this step's value if it is real, else 0 (terminal).
        next_value = values[:, t] * mask_f[:, t]
        next_adv = adv
    returns = (advantages + values) * mask_f
    return advantages, returns
    # END EXERCISE


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss -> (loss, clip_frac, approx_kl); inputs [B, T].

    Taking the max of the two negated terms is the pessimistic bound: once the ratio has
    moved more than clip_range in the direction the advantage rewards, the gradient is 0.
    clip_frac: share of real tokens where the clipped term was chosen (a health signal).
    approx_kl: 0.5 * mean (logp - old_logp)^2, how far this epoch moved from the rollout.
    """
    # BEGIN EXERCISE 11.2: the clipped PPO policy loss
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)  # [B, T]
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    # END EXERCISE
    with torch.no_grad():
        clip_frac = masked_mean((loss_clipped > loss_unclipped).to(logp.dtype), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clip_frac, approx_kl


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss -> (loss, value_clip_frac); inputs [B, T].

    The critic may move at most clip_range_value from the rollout's values before the
    clipped error takes over; max of the two squared errors is again the pessimistic choice.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    err_unclipped = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((err_clipped > err_unclipped).to(values.dtype), mask)
    return loss, clip_frac


# ---------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from
    Human Preferences", section 2.2):

        e      = clip(KL / target - 1, -0.2, 0.2)
        beta  <- beta * (1 + e * n_steps / horizon)

    Too much KL -> beta grows and pulls the policy back; too little -> beta shrinks.
    The clip keeps one noisy KL estimate from swinging beta wildly.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """A constant KL coefficient, same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


# ---------------------------------------------------------------------------
# THE PPO TRAINING LOOP is in ppo_trainer.py (PPOConfig, ppo_step, train_ppo). Per step:
#
#   1. roll out: sample responses to a batch of prompts with the actor (KV-cache generator);
#   2. score: logp (actor), ref_logp (reference = actor with the LoRA adapter off),
#      values (critic), scores (reward model at the last token);
#   3. rewards = kl_penalty_rewards(...); advantages, returns = compute_gae(...);
#      advantages = masked_whiten(advantages, mask);
#   4. for a few PPO epochs over minibatches: ppo_policy_loss + vf_coef * ppo_value_loss
#      (- ent_coef * entropy); step the optimisers;
#   5. kl_ctl.update(mean sequence KL, batch size); log reward, KL, clip_frac, entropy,
#      collapse_stats(...) and print collapse_warnings(...) (collapse.py).
# ---------------------------------------------------------------------------
