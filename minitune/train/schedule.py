"""Learning-rate schedules: linear warmup, then cosine or linear decay (or constant).

With W warmup steps out of T optimizer steps, the multiplier on the peak learning rate at
step s (counted from 0, the step about to be taken) is

    s < W:      m(s) = s / W                                  (warmup from 0)
    after:      p = (s - W) / (T - W)                          (progress through the decay, 0 -> 1)
    cosine:     m(s) = 0.5 * (1 + cos(pi * p))                 (Loshchilov & Hutter 2017, SGDR, no restarts)
    linear:     m(s) = 1 - p
    constant:   m(s) = 1

W = ceil(warmup_ratio * T), as transformers' `get_scheduler` and LLaMA-Factory compute it, and the
decays are those of transformers' `get_cosine_schedule_with_warmup` /
`get_linear_schedule_with_warmup`, so the same config gives the same learning rates.
"""

import math

import torch


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total_steps)


def lr_lambda(step: int, total_steps: int, n_warmup: int, kind: str = "cosine") -> float:
    """The multiplier m(step) from the equations above."""
    if step < n_warmup:
        return step / max(1, n_warmup)
    if kind == "constant":
        return 1.0
    progress = (step - n_warmup) / max(1, total_steps - n_warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    raise ValueError(f"unknown lr_scheduler_type {kind!r}; expected cosine, linear or constant")


def make_scheduler(optimizer, total_steps: int, warmup_ratio: float = 0.0,
                   kind: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state_dict (just the step count) goes into checkpoints."""
    n_warmup = warmup_steps(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total_steps, n_warmup, kind))
