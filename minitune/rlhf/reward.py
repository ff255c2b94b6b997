"""Reward model for RLHF: a scalar head on the transformer, trained on preference pairs.

The reward model (RM) of InstructGPT (Ouyang et al. 2022, "Training language models to
follow instructions with human feedback", section 3.5) is the language model with its
lm_head replaced by a linear layer to one number.  It reads the whole (prompt, response)
sequence and the number at the *last real token* (the EOS) is the score of the sequence:
only there has the causal model seen everything.

It is trained with the Bradley-Terry pairwise loss on pairs where a labeller preferred
``chosen`` over ``rejected``:

    P(chosen > rejected) = sigmoid(r_chosen - r_rejected)
    loss = -mean( log sigmoid(r_chosen - r_rejected - margin) )

``margin`` (optional, one per pair) is LLaMA-2's margin loss (Touvron et al. 2023,
section 3.2.2): pairs the labellers rated "significantly better" must be separated by
more than pairs rated "slightly better".  With margin = 0 it is InstructGPT's loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import minitune

from ..model.checkpoint import save_safetensors
from ..peft.adapter_files import AdapterError
from ..peft.adapter_files import read_adapter_dir
from ..peft.adapter_io import load_adapter
from ..train import train
from ..train.checkpoint import save_final
from .pairs import PairCollator, PairData, PairReport, prepare_pairs, stack_pairs  # noqa: F401 (re-exported)

__all__ = [
    "pairwise_loss",
    "reward_accuracy",
    "last_token_index",
    "gather_last",
    "RewardModel",
    "reward_loss_fn",
    "train_reward_model",
    "score_pairs",
    "save_reward_model",
    "save_value_head",
    "load_reward_model",
    "VALUE_HEAD_FILE",
]


# ---------------------------------------------------------------------------
# Losses and metrics on scores
# ---------------------------------------------------------------------------


def pairwise_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Bradley-Terry loss: mean over pairs of -log sigmoid(r_chosen - r_rejected - margin).

    chosen, rejected: [B] scores; margin: [B] (or a scalar) or None.  Returns a scalar.
    """
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ in shape")
    # BEGIN EXERCISE 10.1: the pairwise (Bradley-Terry) reward loss
    diff = chosen - rejected  # [B]
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    # logsigmoid(x) = -softplus(-x): stable for large |x|, where log(sigmoid(x)) gives -inf.
    return -F.logsigmoid(diff).mean()
    # END EXERCISE


@torch.no_grad()
def reward_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs where the RM scores chosen strictly above rejected (ties count as wrong)."""
    if chosen.numel() == 0:
        raise ValueError("reward_accuracy of an empty batch")
    return (chosen > rejected).float().mean().item()


# ---------------------------------------------------------------------------
# Reading a per-token value at the last real token
# ---------------------------------------------------------------------------


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position of each row: [B, T] mask -> [B] long.

    Works for right padding (1 1 1 0 0 -> 2) and left padding (0 0 1 1 1 -> 4):
    we flip the mask and find the first 1, which is the last 1 of the original row.
    (``mask.sum(1) - 1`` would only be right for right padding.)
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    empty = ~real.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no real tokens (attention_mask all zero); drop them first")
    T = attention_mask.shape[1]
    # argmax returns the first maximum; on the flipped row that is the last real token.
    first_in_flipped = real.flip(dims=[1]).int().argmax(dim=1)  # [B]
    return (T - 1) - first_in_flipped


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values [B, T] (or [B, T, 1]) at each row's last real token -> [B]."""
    if values.dim() == 3 and values.shape[-1] == 1:
        values = values.squeeze(-1)
    if values.shape != attention_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} vs attention_mask {tuple(attention_mask.shape)}")
    idx = last_token_index(attention_mask).to(values.device)  # [B]
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)  # [B]


# ---------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------


class RewardModel(nn.Module):
    """A transformer backbone with a scalar value head.

    The backbone is any module with ``hidden_states(input_ids, attention_mask=None)``
    returning the final-norm output [B, T, H] (what the lm_head would read) and with
    ``config.hidden_size``.  The same class serves as PPO's critic: ``token_values``
    gives a value at every position, ``forward`` the score at the last real token.
    """

    def __init__(self, backbone: nn.Module, init_std: float | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        # A reward model's head starts small and random, std 1/sqrt(H+1), so untrained scores sit near 0
        # with unit-ish scale (OpenAI's lm-human-preferences, Ziegler et al. 2019). A PPO critic's head
        # starts at zero (init_std=0, as the same code does for its value head): V = 0 everywhere, so the
        # first advantages are the plain returns instead of returns minus a random guess.
        std = 1.0 / math.sqrt(hidden + 1) if init_std is None else init_std
        if std > 0:
            nn.init.normal_(self.value_head.weight, std=std)
        else:
            nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        # drawn on the CPU above (the same head on every device), then moved to where the backbone is
        self.value_head.to(next(backbone.parameters()).device)

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A scalar at every position: [B, T] ids -> [B, T] values."""
        h = self.backbone.hidden_states(input_ids, attention_mask=attention_mask)  # [B, T, H]
        # The head runs in float32 even if the backbone is bf16: rewards are compared by
        # small differences and bf16 has only ~3 significant digits.
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1)  # [B, T]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Score of each sequence, read at its last real token: [B, T] -> [B]."""
        values = self.token_values(input_ids, attention_mask)  # [B, T]
        if attention_mask is None:
            return values[:, -1]
        return gather_last(values, attention_mask)


# ---------------------------------------------------------------------------
# Training, scoring, saving
# ---------------------------------------------------------------------------


def reward_loss_fn(margin: float | None = None):
    """A loss_fn for minitune.train: pairwise loss of one batch of pairs, counted in pairs.

    The margin is the batch's per-pair "margin" field if present, plus the constant `margin`.
    Also returns reward accuracy and the mean score gap, which the trainer logs.
    """
    def loss_fn(model, batch: dict):
        # BEGIN EXERCISE 10.2: the reward-model loss_fn
        ids, mask, _ = stack_pairs(batch)  # [2B, T]
        chosen, rejected = model(ids, attention_mask=mask).chunk(2)  # [B] each, read at the last real token
        m = batch.get("margin")
        if margin is not None:
            m = margin if m is None else m + margin
        loss = pairwise_loss(chosen, rejected, m)
        gap = (chosen - rejected).detach()
        return loss, chosen.shape[0], {"accuracy": (gap > 0).float().mean(), "margin": gap.mean()}
        # END EXERCISE

    return loss_fn


def train_reward_model(rm: RewardModel, data: PairData, cfg, tokenizer, margin: float | None = None):
    """Train `rm` on data.train with minitune.train (loss, accuracy and score gap in its log)."""
    return train(rm, data.train, cfg, val_data=data.val or None, collate=PairCollator(tokenizer),
                 loss_fn=reward_loss_fn(margin), tokenizer=tokenizer)


@torch.no_grad()
def score_pairs(rm: RewardModel, features: list[dict], tokenizer, batch_size: int = 32) -> dict:
    """Scores of every pair: {"chosen": [N], "rejected": [N], "accuracy": float, "margin": float}."""
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    collate, chosen, rejected = PairCollator(tokenizer), [], []
    for i in range(0, len(features), batch_size):
        ids, mask, _ = stack_pairs(collate(features[i:i + batch_size]))
        c, r = rm(ids.to(device), attention_mask=mask.to(device)).float().cpu().chunk(2)
        chosen.append(c)
        rejected.append(r)
    rm.train(was_training)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"chosen": chosen, "rejected": rejected, "accuracy": reward_accuracy(chosen, rejected),
            "margin": (chosen - rejected).mean().item()}


VALUE_HEAD_FILE = "value_head.safetensors"


def save_value_head(rm: RewardModel, out_dir) -> Path:
    """value_head.safetensors (TRL's file name for the same thing) in `out_dir`: weight [1, H], bias [1]."""
    out = Path(out_dir)
    save_safetensors({k: v.detach().float().cpu().contiguous() for k, v in rm.value_head.state_dict().items()},
                     out / VALUE_HEAD_FILE, metadata={"format": "pt"})
    return out / VALUE_HEAD_FILE


def save_reward_model(rm: RewardModel, tokenizer, out_dir) -> Path:
    """The backbone as a normal checkpoint in `out_dir` (beside a training log, which stays) plus
    value_head.safetensors. (With LoRA, `minitune train` saves the adapter instead of the backbone,
    beside the same value head file, as LLaMA-Factory's reward stage does.)"""
    out = save_final(rm.backbone, tokenizer, out_dir)
    save_value_head(rm, out)
    return out


def load_reward_model(path, device="cpu", dtype=None) -> tuple[RewardModel, object]:
    """(RewardModel, tokenizer) from a folder written by save_reward_model, or from a LoRA reward model's
    folder (adapter_config.json + value head): its base model (adapter_config's base_model_name_or_path)
    with the adapter on it."""
    path = Path(path)
    if not (path / VALUE_HEAD_FILE).exists():
        raise FileNotFoundError(f"{path}: no {VALUE_HEAD_FILE}; is this a reward model saved by save_reward_model?")
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        base = read_adapter_dir(path)[1].get("base_model_name_or_path")
        if not base:
            raise AdapterError(f"{path / 'adapter_config.json'}: no base_model_name_or_path to put the adapter on")
        backbone = load_adapter(minitune.load_pretrained(base, device=device, dtype=dtype)[0], path)
        tok = minitune.load_tokenizer(path)
    else:
        backbone, tok = minitune.load_pretrained(path, device=device, dtype=dtype)
    rm = RewardModel(backbone).to(device)
    rm.value_head.load_state_dict(load_file(path / VALUE_HEAD_FILE))
    return rm, tok
