"""The collapse watch: the two ways an RLHF run dies, measured on every rollout batch.

Seed tutorial 002 names them: the policy becomes a **repeater** that loops until the length limit,
or goes **mute** and answers with the end token only. Both are cheap to see in the sampled
responses (their length, their repeated n-grams) long before the reward curve says anything;
PPO and GRPO log these numbers every step and print ``collapse_warnings`` as they fire.
"""

from __future__ import annotations

import torch

__all__ = ["repetition_rate", "collapse_stats", "collapse_warnings"]


def repetition_rate(token_ids: torch.Tensor, mask: torch.Tensor, n: int = 3) -> torch.Tensor:
    """Per response, the fraction of its n-grams that repeat an earlier n-gram: [B, T] -> [B].

    "a b c a b c a b c" with n=3 has 7 trigrams, 3 distinct -> 4/7 repeated.
    A response shorter than n has no n-grams and rate 0.
    """
    rates = []
    for ids, m in zip(token_ids.tolist(), mask.bool().tolist()):
        toks = [tok for tok, real in zip(ids, m) if real]
        ngrams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        rates.append(0.0 if not ngrams else 1.0 - len(set(ngrams)) / len(ngrams))
    return torch.tensor(rates)


def collapse_stats(token_ids: torch.Tensor, mask: torch.Tensor, n: int = 3) -> dict[str, float]:
    """Response length and repetition numbers for one rollout batch, for collapse_warnings."""
    lengths = mask.to(torch.float32).sum(dim=1)  # [B]
    rep = repetition_rate(token_ids, mask, n=n)
    return {
        "response_length": lengths.mean().item(),
        "short_frac": (lengths <= 1).float().mean().item(),  # EOS-only or empty
        "repetition_rate": rep.mean().item(),
    }


def collapse_warnings(
    stats: dict[str, float], min_response_length: float = 1.5, max_repetition_rate: float = 0.5
) -> list[str]:
    """Human-readable warnings for a collapsing run (an empty list when healthy).

    stats: a dict with "response_length" (mean real response tokens, EOS included) and
    "repetition_rate" (mean of repetition_rate); "short_frac" optional.  Missing keys are
    not checked.  Thresholds are deliberately loose: they catch collapse, not style.
    """
    warnings = []
    length = stats.get("response_length")
    short = stats.get("short_frac")
    if (length is not None and length <= min_response_length) or (short is not None and short >= 0.5):
        warnings.append(
            f"EOS-only collapse: mean response length {length if length is not None else float('nan'):.2f} tokens"
            + (f", {short:.0%} of responses are EOS-only or empty" if short is not None else "")
            + "; the policy found that saying nothing is safest (raise kl_coef, lower the lr, check the reward for a length penalty)"
        )
    rep = stats.get("repetition_rate")
    if rep is not None and rep >= max_repetition_rate:
        warnings.append(
            f"loop collapse: {rep:.0%} of response n-grams are repeats; the policy is looping until max length "
            "(raise kl_coef, lower the lr, check the reward model is not paying for repetition)"
        )
    return warnings
