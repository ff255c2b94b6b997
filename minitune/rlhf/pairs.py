"""Preference pairs: {"prompt", "chosen", "rejected"} records -> token ids, bad pairs counted.

Shared by the reward model (reward.py, lesson 10) and DPO (dpo.py, lesson 12), which read the
same pairs. Each side is prompt + reply rendered through the chat template, with labels -100 on
the prompt (as in SFT); the two sides of a batch can be stacked into one 2B-row batch so that one
forward pass scores both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX, PreferenceCollator, split_train_val, tokenize_preference
from ..data.formats import RecordError, iter_records
from ..data.preference import parse_preference

__all__ = ["PairReport", "PairData", "prepare_pairs", "PairCollator", "stack_pairs"]


@dataclass
class PairReport:
    """What happened to every preference record, so no pair disappears unnoticed."""

    records: int = 0
    identical: int = 0  # chosen == rejected (up to surrounding blanks): the pair teaches nothing -> dropped
    empty_response: int = 0  # chosen or rejected is blank: no token to score -> dropped
    prompt_too_long: int = 0  # the prompt alone fills cutoff_len: no response token left -> dropped
    bad_record: int = 0  # not a preference record (missing field, bad JSON, ...) -> dropped
    truncated: int = 0  # a response cut at cutoff_len (kept: its first tokens still differ)
    train: int = 0
    val: int = 0
    notes: list[str] = field(default_factory=list)  # the first few reasons, with the record number

    @property
    def dropped(self) -> int:
        return self.identical + self.empty_response + self.prompt_too_long + self.bad_record

    def summary(self) -> str:
        return (f"{self.records} pairs read; dropped {self.dropped} (identical chosen/rejected {self.identical}, "
                f"empty response {self.empty_response}, prompt longer than cutoff {self.prompt_too_long}, "
                f"bad record {self.bad_record}); {self.truncated} truncated; train {self.train}, val {self.val}")

    def _drop(self, kind: str, where, why: str):
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.notes) < 5:
            self.notes.append(f"record {where}: {why}")


@dataclass
class PairData:
    train: list[dict]  # features: chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels[, margin]
    val: list[dict]
    report: PairReport


def _reply_text(value) -> str | None:
    if isinstance(value, list) and value and isinstance(value[-1], dict):  # [..., {"role": "assistant", ...}]
        value = value[-1].get("content")
    return value if isinstance(value, str) else None


def _pair_problem(rec) -> tuple[str, str] | None:
    """(report field, reason) for the pair problems we count by name; None if none of them."""
    if not isinstance(rec, dict):
        return None
    chosen, rejected = _reply_text(rec.get("chosen")), _reply_text(rec.get("rejected"))
    if chosen is None or rejected is None:
        return None  # the parser names what is missing
    if "prompt" in rec and not (chosen.strip() and rejected.strip()):
        return "empty_response", f"{'chosen' if not chosen.strip() else 'rejected'} response is empty"
    if chosen.strip() == rejected.strip():
        return "identical", "chosen and rejected are the same response"
    return None


def prepare_pairs(data, tokenizer, template: str = "chatml", cutoff_len: int = 1024, val_size: float | int = 0,
                  seed: int = 0) -> PairData:
    """Preference records (a JSON/JSONL path or a list of dicts) -> tokenised train / val pairs.

    Each side is prompt + reply through the chat template, labels -100 on the prompt (see
    minitune.data.tokenize_preference). Dropped and counted: identical pairs, empty replies, prompts
    that leave no room for a reply within cutoff_len, malformed records. A record may carry a numeric
    "margin" (LLaMA-2's margin loss); it travels with the feature.
    """
    report = PairReport()
    records = iter_records(data) if isinstance(data, (str, Path)) else enumerate(data, 1)
    features = []
    for where, rec in records:
        report.records += 1
        problem = _pair_problem(rec)
        if problem:
            report._drop(*problem[:1], where, problem[1])
            continue
        try:
            if isinstance(rec, RecordError):
                raise rec
            example = parse_preference(rec)
        except RecordError as e:
            report._drop("bad_record", where, str(e))
            continue
        feat = tokenize_preference(tokenizer, template, example, cutoff_len=None)  # untruncated first
        n_prompt = next(i for i, x in enumerate(feat["chosen_labels"]) if x != IGNORE_INDEX)  # shared prompt
        if cutoff_len and n_prompt >= cutoff_len:
            report._drop("prompt_too_long", where, f"prompt is {n_prompt} tokens, cutoff_len {cutoff_len}")
            continue
        if cutoff_len and max(len(feat["chosen_input_ids"]), len(feat["rejected_input_ids"])) > cutoff_len:
            report.truncated += 1
            feat = {k: v[:cutoff_len] for k, v in feat.items()}
        if isinstance(rec.get("margin"), (int, float)):
            feat["margin"] = float(rec["margin"])
        features.append(feat)
    train, val = split_train_val(features, val_size, seed)
    report.train, report.val = len(train), len(val)
    return PairData(train, val, report)


class PairCollator(PreferenceCollator):
    """PreferenceCollator (chosen_* and rejected_* padded) plus any float fields every feature has:
    "margin", and DPO's precomputed "ref_chosen_logps" / "ref_rejected_logps"."""

    FLOAT_FIELDS = ("margin", "ref_chosen_logps", "ref_rejected_logps")

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = super().__call__(batch)
        for key in self.FLOAT_FIELDS:
            if all(key in f for f in batch):
                out[key] = torch.tensor([f[key] for f in batch], dtype=torch.float32)  # [B]
        return out


def stack_pairs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows in one right-padded batch: (input_ids, attention_mask, labels),
    each [2B, T]. One forward pass scores both sides (and DDP sees one call of the model)."""
    T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(key: str, pad: int) -> torch.Tensor:
        return torch.cat([F.pad(batch[f"{side}_{key}"], (0, T - batch[f"{side}_{key}"].shape[1]), value=pad)
                          for side in ("chosen", "rejected")])

    return both("input_ids", 0), both("attention_mask", 0), both("labels", IGNORE_INDEX)
