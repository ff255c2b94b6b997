"""SimPO: a reference-free DPO whose implicit reward is the length-averaged log-probability.

SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward")
replaces DPO's reward beta * log(pi / pi_ref) by beta times the reply's log-probability AVERAGED
over its tokens, the quantity greedy decoding actually ranks by, and asks the chosen reply to
win by a margin gamma (a target reward margin, as in a hinge/SVM):

    r(x, y) = beta / |y| * log pi(y | x)
    loss    = -log sigmoid( r(x, y_w) - r(x, y_l) - gamma )                 simpo_gamma = gamma

No reference model in memory or in the loss. Averaging matters: with summed log-probs the
loss would prefer long chosen replies and short rejected ones for their length alone.

Options, as the libraries have them:
  label_smoothing eps (TRL's CPOTrainer, loss_type "simpo"): the conservative form of DPO,
      -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), z = the argument above;
  an SFT term: LLaMA-Factory (pref_loss: simpo, pref_ftx) adds pref_ftx * (-log p(y_w) averaged
      per token, then over the batch); TRL's CPO adds cpo_alpha times the cross-entropy of the
      chosen replies' tokens averaged over the whole batch. The two agree when the chosen replies
      of a batch have equal lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..train import train
from .dpo import pair_lengths, policy_logps, sft_term
from .pairs import PairCollator, PairData

__all__ = ["simpo_loss", "simpo_loss_fn", "train_simpo"]


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, chosen_rewards, rejected_rewards).

    chosen_logps, rejected_logps: [B] per-token AVERAGED log-probs of each reply. loss: scalar batch
    mean; rewards: [B] beta * average log-prob, detached (for logging accuracy and margin).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = beta * (chosen_logps - rejected_logps) - gamma  # [B]
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return losses.mean(), beta * chosen_logps.detach(), beta * rejected_logps.detach()


def simpo_loss_fn(beta: float = 2.0, gamma: float = 0.5, ftx: float = 0.0, label_smoothing: float = 0.0):
    """A loss_fn for minitune.train: SimPO on one batch of pairs, counted in pairs; ftx > 0 (pref_ftx)
    adds ftx * dpo.sft_term as LLaMA-Factory does. Logs TRL's metric names."""
    def loss_fn(model, batch: dict):
        chosen, rejected = policy_logps(model, batch)  # [B] summed over reply tokens
        n_chosen, n_rejected = pair_lengths(batch)
        chosen_avg, rejected_avg = chosen / n_chosen, rejected / n_rejected  # [B]
        loss, chosen_rewards, rejected_rewards = simpo_loss(chosen_avg, rejected_avg, beta, gamma, label_smoothing)
        if ftx > 0:
            loss = loss + ftx * sft_term(chosen, n_chosen)
        metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                   "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                   "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                   "logps/chosen": chosen_avg.detach().mean(), "logps/rejected": rejected_avg.detach().mean()}
        return loss, chosen.shape[0], metrics

    return loss_fn


def train_simpo(model, data: PairData, cfg, tokenizer):
    """SimPO with minitune.train (beta = cfg.pref_beta, gamma = cfg.simpo_gamma, cfg.pref_ftx)."""
    return train(model, data.train, cfg, val_data=data.val or None, collate=PairCollator(tokenizer),
                 loss_fn=simpo_loss_fn(cfg.pref_beta, cfg.simpo_gamma, cfg.pref_ftx), tokenizer=tokenizer)
