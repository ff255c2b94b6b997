"""KTO: alignment from unpaired thumbs-up / thumbs-down replies (prospect theory, not pairs).

KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") needs no
chosen/rejected pairs: each reply y to a prompt x is labelled desirable or undesirable. With DPO's
implicit reward r(x, y) = log pi(y|x) - log pi_ref(y|x) (summed over the reply's tokens), each reply
is valued against a reference point z0, as prospect theory values a gain or a loss against the
status quo:

    z0   = max(0, mean over the batch of [log pi(y'|x) - log pi_ref(y'|x)])    a KL(pi || pi_ref) estimate
    v(x, y) = lambda_D * sigmoid(beta (r(x, y) - z0))    if y is desirable
              lambda_U * sigmoid(beta (z0 - r(x, y)))    if y is undesirable
    loss = mean over the batch of (lambda_y - v(x, y))
         = mean of lambda_D (1 - sigmoid(beta (r - z0)))  /  lambda_U (1 - sigmoid(beta (z0 - r)))

y' in z0 is a MISMATCHED reply: prompt x_i with the reply of another example (data/kto.py pairs each
prompt with the previous example's reply), so the estimate measures how far the policy has moved in
general, not on the labelled replies. z0 is detached (no gradient flows through it) and clamped at 0,
as in the paper and TRL's KTOTrainer: a desirable reply must beat "what the policy does anyway".
lambda_D, lambda_U are LLaMA-Factory's kto_chosen_weight, kto_rejected_weight (TRL's
desirable_weight, undesirable_weight): with unbalanced data the paper keeps
lambda_D n_D / (lambda_U n_U) in [1, 4/3]. beta = pref_beta.

The reference log-probs are computed once before training (add_kto_reference_logps), as for DPO:
the model as it is then, with LoRA adapters switched off if it has any.

On W processes the batch of z0 is the global micro-batch: the mismatched log-ratios are gathered from
every process first, as TRL's KTOTrainer gathers them, so W processes take one process's steps.
"""

from __future__ import annotations

import torch

from ..data.kto import KTOCollator, KTOData
from ..train import distributed, train
from .dpo import add_reference_columns, sequence_logps

__all__ = ["kto_loss", "kto_logps", "kto_loss_fn", "add_kto_reference_logps", "count_examples", "train_kto"]


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, rewards, z0).

    policy_logps, ref_logps: [B] summed log-probs of each labelled reply; desirable: [B] bool;
    kl_logps, kl_ref_logps: [B] the same for the mismatched replies. loss: scalar mean over the batch;
    rewards: [B] beta * (log pi - log pi_ref), detached; z0: the clamped KL estimate (a scalar).
    """
    z0 = (kl_logps - kl_ref_logps).mean().detach().clamp(min=0)  # the reference point, no gradient
    logratios = policy_logps - ref_logps  # [B] r(x, y)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))  # [B]
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))  # [B]
    losses = torch.where(desirable, desirable_losses, undesirable_losses)  # each reply its own kind
    return losses.mean(), beta * logratios.detach(), z0


def kto_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi of the labelled replies [B], log pi of the mismatched replies [B]); the second without
    gradient: only z0 reads it, and z0 is detached."""
    logps = sequence_logps(model(batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"])
    with torch.no_grad():
        kl = sequence_logps(model(batch["KL_input_ids"], attention_mask=batch["KL_attention_mask"]), batch["KL_labels"])
    return logps, kl


def count_examples(batch: dict) -> int:
    """A KTO batch is counted in replies (the loss is a mean over them), not in tokens."""
    return len(batch["label"])


def _mean_where(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values[mask].mean() if mask.any() else values.new_zeros(())


def kto_loss_fn(beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """A loss_fn for minitune.train: KTO on one batch, its reference log-probs from the batch
    ("ref_logps", "ref_KL_logps": add_kto_reference_logps). Logs TRL's names: the mean reward of each
    kind of reply, and "kl" (z0)."""
    def loss_fn(model, batch: dict):
        logps, kl_logps = kto_logps(model, batch)
        desirable = batch["label"].bool()
        # z0 over the global micro-batch: every process's mismatched replies (one process: its own)
        kl_logps, kl_ref_logps = (distributed.all_gather_rows(t) for t in (kl_logps, batch["ref_KL_logps"]))
        loss, rewards, z0 = kto_loss(logps, batch["ref_logps"], desirable, kl_logps, kl_ref_logps, beta,
                                     desirable_weight, undesirable_weight)
        metrics = {"kl": z0, "rewards/chosen": _mean_where(rewards, desirable),
                   "rewards/rejected": _mean_where(rewards, ~desirable),
                   "logps/chosen": _mean_where(logps.detach(), desirable),
                   "logps/rejected": _mean_where(logps.detach(), ~desirable)}
        return loss, len(desirable), metrics

    return loss_fn


@torch.no_grad()
def add_kto_reference_logps(model, features: list[dict], tokenizer, batch_size: int = 32) -> list[dict]:
    """Copies of `features` with "ref_logps" and "ref_KL_logps" of `model` as it is now (LoRA off)."""
    return add_reference_columns(model, features, KTOCollator(tokenizer), kto_logps, ("ref_logps", "ref_KL_logps"),
                                 batch_size)


def train_kto(model, data: KTOData, cfg, tokenizer, reference=None):
    """KTO with minitune.train: reference log-probs first (`reference`, or `model` as it is now), then
    the policy trains on data.train (cfg.pref_beta, cfg.kto_chosen_weight, cfg.kto_rejected_weight)."""
    reference = model if reference is None else reference
    train_data = add_kto_reference_logps(reference, data.train, tokenizer)
    val_data = add_kto_reference_logps(reference, data.val, tokenizer) if data.val else None
    return train(model, train_data, cfg, val_data=val_data, collate=KTOCollator(tokenizer),
                 loss_fn=kto_loss_fn(cfg.pref_beta, cfg.kto_chosen_weight, cfg.kto_rejected_weight),
                 count_fn=count_examples, tokenizer=tokenizer)
