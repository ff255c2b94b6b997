"""AdamW with weight decay only where it means something.

AdamW (Loshchilov & Hutter 2019) decays weights directly: w <- w - lr * (adam_update + wd * w),
pulling every weight toward 0. That is a prior for the big matrices, but for RMSNorm gains
(whose natural value is 1) and biases it only fights the model, so, as in GPT-2/nanoGPT,
LLaMA-Factory and transformers' Trainer, parameters with fewer than 2 dimensions (norm weights,
biases) or named like a norm/bias go into a group with weight_decay = 0.

Only parameters with requires_grad are handed to the optimizer: frozen ones (a frozen
embedding, a base model under LoRA) get no moments and cost no optimizer memory.
"""

import torch
import torch.nn as nn


def no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or name.endswith("bias") or "norm" in name.lower()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{decayed params, weight_decay}, {norms and biases, weight_decay 0}], trainable only."""
    decay, keep = [], []
    for name, p in model.named_parameters():  # named_parameters() yields a tied weight once
        if p.requires_grad:
            (keep if no_decay(name, p) else decay).append(p)
    if not decay and not keep:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                   betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the betas/eps are transformers' defaults."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
