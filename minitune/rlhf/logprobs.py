"""Per-token helpers that PPO, GRPO and DPO share: log-probabilities, entropy, masked means.

Shapes: B = batch of sequences, T = positions, V = vocabulary. Everything the RL losses average runs
over real tokens only (``mask`` = 1), never over padding.
"""

from __future__ import annotations

import torch

__all__ = ["logprobs_from_logits", "entropy_from_logits", "masked_mean"]


# ---------------------------------------------------------------------------
# Per-token log-probabilities and entropy
# ---------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position: logits [B, T, V], labels [B, T] -> [B, T].

    log p(y) = logit_y - logsumexp(logits).  We gather one logit and compute logsumexp
    one sequence at a time, so the full [B, T, V] log_softmax tensor (the largest
    tensor in RLHF with a big vocabulary) is never materialised at once.
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    # float32 for the normaliser: logsumexp over 32k bf16 values loses the small differences.
    lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # [B, T]
    return picked.float() - lse


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: [B, T, V] -> [B, T].

    H = -sum p log p = logsumexp(z) - sum softmax(z) * z   (no log of a tiny p needed).
    """
    out = []
    for row in logits:  # one [T, V] at a time, for memory as above
        row = row.float()
        p = torch.softmax(row, dim=-1)
        out.append(torch.logsumexp(row, dim=-1) - (p * row).sum(dim=-1))
    return torch.stack(out)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of values where mask is 1 (over everything, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)
