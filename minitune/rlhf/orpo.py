"""ORPO: preference optimisation without a reference model and without a separate SFT stage.

ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model")
adds one term to supervised fine-tuning on the chosen replies. With log p(y) the log-probability
of a reply AVERAGED over its tokens (so p(y) is a per-token "geometric mean" probability in (0, 1)),
the odds of a reply are p / (1 - p), and

    log odds(y)  = log p(y) - log(1 - p(y))
    L_OR         = -log sigmoid( log odds(y_w) - log odds(y_l) )          the odds-ratio term
    L_ORPO       = L_SFT + lambda * L_OR                                    lambda = pref_beta

L_SFT is the negative log-likelihood of the chosen reply. No reference model: the SFT term keeps
the policy on the data, the odds ratio pushes the rejected reply's odds below the chosen one's.

log(1 - p) with log p close to 0 (a confident reply) cancels catastrophically if written as
log(1 - exp(x)); log1mexp below switches between log1p(-exp(x)) and log(-expm1(x)) at
x = -log 2 (Maechler 2012, "Accurately Computing log(1 - exp(-|a|))").

What L_SFT averages over differs between the two libraries people run ORPO with, so orpo_loss
takes it as an argument:
  LLaMA-Factory (pref_loss: orpo, what `minitune train` does): -log p(y_w) averaged over the
      reply's tokens, then over the batch (dpo.sft_term);
  TRL's ORPOTrainer: the cross-entropy of the whole chosen sequence, prompt tokens included,
      averaged over all the batch's tokens.
The odds-ratio term is the same in both (tests/test_pref_family.py checks both against TRL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..train import train
from .dpo import pair_lengths, policy_logps, sft_term
from .pairs import PairCollator, PairData

__all__ = ["log1mexp", "orpo_loss", "orpo_loss_fn", "train_orpo"]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (see the module docstring)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, nll: torch.Tensor, beta: float = 0.1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, chosen_rewards, rejected_rewards, log_odds).

    chosen_logps, rejected_logps: [B] per-token AVERAGED log-probs of each reply. nll: the scalar
    SFT term L_SFT. beta: ORPO's lambda. loss = nll + beta * mean(L_OR), a scalar; the rewards are
    beta * log p (detached, for logging, as TRL's); log_odds: [B] log odds(y_w) - log odds(y_l).
    """
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))  # [B]
    odds_ratio_loss = -F.logsigmoid(log_odds)  # [B]
    loss = nll + beta * odds_ratio_loss.mean()
    return loss, beta * chosen_logps.detach(), beta * rejected_logps.detach(), log_odds.detach()


def orpo_loss_fn(beta: float = 0.1, ftx: float = 0.0):
    """A loss_fn for minitune.train: ORPO on one batch of pairs (LLaMA-Factory's form), counted in pairs.

    L_SFT = dpo.sft_term (per-token average of the chosen reply); ftx > 0 (pref_ftx) adds ftx times
    it once more, as LLaMA-Factory does for every pref_loss. Logs TRL's ORPO metric names.
    """
    def loss_fn(model, batch: dict):
        chosen, rejected = policy_logps(model, batch)  # [B] summed over reply tokens
        n_chosen, n_rejected = pair_lengths(batch)
        chosen_avg, rejected_avg = chosen / n_chosen, rejected / n_rejected  # [B] per-token averages
        nll = sft_term(chosen, n_chosen)
        loss, chosen_rewards, rejected_rewards, log_odds = orpo_loss(chosen_avg, rejected_avg, nll, beta)
        if ftx > 0:
            loss = loss + ftx * nll
        metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                   "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                   "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                   "logps/chosen": chosen_avg.detach().mean(), "logps/rejected": rejected_avg.detach().mean(),
                   "nll_loss": nll.detach(), "log_odds_ratio": F.logsigmoid(log_odds).mean(),
                   "log_odds_chosen": log_odds.mean()}
        return loss, chosen.shape[0], metrics

    return loss_fn


def train_orpo(model, data: PairData, cfg, tokenizer):
    """ORPO with minitune.train on data.train (lambda = cfg.pref_beta): no reference log-probs to compute."""
    return train(model, data.train, cfg, val_data=data.val or None, collate=PairCollator(tokenizer),
                 loss_fn=orpo_loss_fn(cfg.pref_beta, cfg.pref_ftx), tokenizer=tokenizer)
