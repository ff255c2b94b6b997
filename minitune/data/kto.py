"""Unpaired feedback for KTO: one conversation and a thumbs-up or thumbs-down on its last reply.

KTO (rlhf/kto.py) learns from single replies labelled desirable (true) or undesirable (false), the
data people collect with a like button, instead of chosen/rejected pairs. A record is a chat whose
last message is the assistant reply being judged, plus a boolean label:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}], "label": true}

LLaMA-Factory's kto_en_demo registers that layout with `"columns": {"messages": "messages",
"kto_tag": "label"}` and role/content tags (registry.py turns it into the form above); ShareGPT
`conversations` of from/value, and TRL's unpaired `prompt` / `completion` / `label`, are read too.

Each example also carries a MISMATCHED pair for KTO's reference point z0: its own prompt with the
reply of the example before it (the first takes the last one's), as TRL builds them. Nothing is
dropped quietly: a record without a boolean label stops the run naming its file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .dataset import PaddingCollator, n_trainable, split_train_val, tokenize_conversation
from .formats import (DataError, RecordError, check_conversation, iter_records, parse_alpaca, parse_openai,
                      parse_sharegpt)

__all__ = ["KTOExample", "KTOData", "parse_kto", "read_kto", "prepare_kto", "KTOCollator"]


@dataclass
class KTOExample:
    prompt: list[dict]  # messages, ending with a user turn
    completion: str  # the assistant reply that was judged
    label: bool  # True: desirable, False: undesirable


@dataclass
class KTOData:
    train: list[dict]  # features: input_ids, labels, KL_input_ids, KL_labels, label
    val: list[dict]
    desirable: int = 0
    undesirable: int = 0
    prompt_too_long: int = 0  # the prompt fills cutoff_len: no reply token left -> dropped (counted)

    def summary(self) -> str:
        return (f"{self.desirable + self.undesirable + self.prompt_too_long} examples read: {self.desirable} "
                f"desirable, {self.undesirable} undesirable; dropped {self.prompt_too_long} (prompt longer than "
                f"cutoff); train {len(self.train)}, val {len(self.val)}")


def parse_kto(rec) -> KTOExample:
    """One record -> KTOExample; RecordError says what is wrong with it."""
    if not isinstance(rec, dict):
        raise RecordError(f"expected a JSON object, got {type(rec).__name__}")
    label = rec.get("label")
    if not isinstance(label, bool):
        got = "no 'label' field" if "label" not in rec else f"label {label!r}"
        raise RecordError(f"{got}; KTO data needs a boolean label (true: a desirable reply, false: undesirable)")
    if "prompt" in rec and "completion" in rec:  # TRL's unpaired layout
        prompt, completion = rec["prompt"], rec["completion"]
        if not isinstance(completion, str):
            raise RecordError("field 'completion' must be a string")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        messages = parse_openai({"messages": prompt}, need_reply=False)
        messages = check_conversation(messages + [{"role": "assistant", "content": completion}])
    elif "conversations" in rec:
        messages = parse_sharegpt(rec)
    elif "instruction" in rec:
        messages = parse_alpaca(rec)
    else:
        messages = parse_openai(rec)
    if messages[-1]["role"] != "assistant" or not isinstance(messages[-1]["content"], str):
        raise RecordError("the conversation must end with the assistant reply that is labelled")
    return KTOExample(messages[:-1], messages[-1]["content"], label)


def read_kto(path: str | Path, transform=None, max_samples: int | None = None) -> list[KTOExample]:
    """Every record of a JSON / JSONL file; the first bad one stops the run, naming file and line."""
    out = []
    for line, rec in iter_records(path):
        try:
            if isinstance(rec, RecordError):
                raise rec
            out.append(parse_kto(transform(rec) if transform else rec))
        except RecordError as e:
            raise DataError(f"{path} line {line}: {e}") from None
        if max_samples is not None and len(out) >= max_samples:
            break
    return out


def _feature(tokenizer, template, prompt: list[dict], reply: str, cutoff_len: int | None) -> dict | None:
    feat = tokenize_conversation(tokenizer, template, prompt + [{"role": "assistant", "content": reply}])
    if cutoff_len:
        feat = {k: v[:cutoff_len] for k, v in feat.items()}
    return feat if n_trainable(feat) else None


def _with_mismatched_pairs(features: list[dict], examples: list[KTOExample], tokenizer, template, cutoff_len):
    """Feature i gets KL_input_ids / KL_labels: prompt i with the reply of example i - 1 (cyclically)."""
    out = []
    for i, (feat, ex) in enumerate(zip(features, examples)):
        kl = _feature(tokenizer, template, ex.prompt, examples[i - 1].completion, cutoff_len)
        if kl is None:  # cannot happen unless cutoff_len leaves no room; keep the pair itself then
            kl = {"input_ids": feat["input_ids"], "labels": feat["labels"]}
        out.append({**feat, "KL_input_ids": kl["input_ids"], "KL_labels": kl["labels"]})
    return out


def prepare_kto(examples: list[KTOExample], tokenizer, template: str = "chatml", cutoff_len: int | None = 1024,
                val_size: float | int = 0, seed: int = 0) -> KTOData:
    """Tokenise (labels only on the judged reply), split, and add each split's mismatched pairs."""
    kept, data = [], KTOData([], [])
    for ex in examples:
        feat = _feature(tokenizer, template, ex.prompt, ex.completion, cutoff_len)
        if feat is None:
            data.prompt_too_long += 1
            continue
        kept.append(({**feat, "label": ex.label}, ex))
        data.desirable += ex.label
        data.undesirable += not ex.label
    train, val = split_train_val(kept, val_size, seed)
    for name, part in (("train", train), ("val", val)):
        if part:
            feats, exs = zip(*part)
            setattr(data, name, _with_mismatched_pairs(list(feats), list(exs), tokenizer, template, cutoff_len))
    return data


class KTOCollator:
    """Pad the judged sequences (input_ids, attention_mask, labels) and the mismatched ones (KL_*);
    "label" as a bool tensor [B]; the reference log-probs "ref_logps", "ref_KL_logps" when present."""

    FLOAT_FIELDS = ("ref_logps", "ref_KL_logps")

    def __init__(self, tokenizer=None, pad_id: int | None = None):
        self.pad = PaddingCollator(tokenizer, pad_id)

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = self.pad([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in batch])
        kl = self.pad([{"input_ids": f["KL_input_ids"], "labels": f["KL_labels"]} for f in batch])
        out.update({f"KL_{k}": v for k, v in kl.items()})
        out["label"] = torch.tensor([bool(f["label"]) for f in batch])  # [B]
        for key in self.FLOAT_FIELDS:
            if all(key in f for f in batch):
                out[key] = torch.tensor([f[key] for f in batch], dtype=torch.float32)  # [B]
        return out

