"""From conversations to training tensors: token ids, a loss mask, batches.

Supervised fine-tuning is next-token prediction on a rendered conversation, with one twist:
the loss only counts the tokens the model is meant to *write*. Labels are the input ids with
every other position set to ``IGNORE_INDEX`` (-100, which ``torch.nn.functional.cross_entropy``
skips). Because the chat template marks each assistant reply (and its end-of-turn token) as
trainable, a dialogue with three replies trains on all three in a single forward pass, rather
than only on the last one with the rest as prompt.

The tokenizer can be any object with ``encode(text) -> list[int]`` (no BOS/EOS added, special
token strings in the text mapped to their ids), ``decode(ids) -> str`` and the ints
``eos_id``, ``pad_id``, ``bos_id`` (the last two may be ``None``); ``minitune.load_tokenizer``
returns one.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .formats import load_examples
from .preference import PreferenceExample
from .templates import BOS, EOS, Template, get_template

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_MARKERS = re.compile(f"({re.escape(BOS)}|{re.escape(EOS)})")


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels for rendered ``(text, trainable)`` segments.

    Each segment is encoded on its own, so no token straddles the line between prompt and
    reply. That is also how generation sees it: the prompt is encoded up to the assistant
    header and the model continues from there. In ChatML and Llama-3 the segments meet at
    special tokens or newlines, where byte-level BPE splits anyway, so the ids equal those of
    encoding the whole text; after e.g. ChatGLM's "答：" they can differ, as in ChatGLM's code.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in segments:
        for piece in _MARKERS.split(text):
            if piece == BOS:
                new = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
            elif piece == EOS:
                new = [tokenizer.eos_id]
            else:
                new = tokenizer.encode(piece) if piece else []
            ids += new
            labels += new if trainable else [IGNORE_INDEX] * len(new)
    return ids, labels


def tokenize_conversation(tokenizer, template: str | Template, messages: list[dict]) -> dict:
    """``{"input_ids", "labels"}`` for one conversation, untruncated."""
    ids, labels = encode_segments(tokenizer, get_template(template).segments(messages))
    return {"input_ids": ids, "labels": labels}


def n_trainable(feature: dict) -> int:
    return sum(1 for x in feature["labels"] if x != IGNORE_INDEX)


@dataclass
class DataReport:
    """Counts of everything that happened to the data, so nothing disappears unnoticed."""

    records: int = 0  # examples handed to tokenisation
    skipped_bad: int = 0  # records the reader rejected (skip_bad=True)
    truncated: int = 0  # cut to cutoff_len, still with trainable tokens
    dropped_no_trainable: int = 0  # nothing left to learn from after truncation
    train: int = 0
    val: int = 0

    def summary(self) -> str:
        return (f"{self.records} examples read ({self.skipped_bad} bad records skipped); "
                f"{self.truncated} truncated, {self.dropped_no_trainable} dropped with no trainable "
                f"tokens left; train {self.train}, val {self.val}")


def tokenize_all(examples, tokenizer, template: str | Template, cutoff_len: int | None = None,
                 report: DataReport | None = None) -> tuple[list[dict], DataReport]:
    """Tokenise conversations, cut each to ``cutoff_len`` tokens (keeping the start).

    A sample whose trainable tokens all fall past the cut would only teach the model to
    predict nothing; it is dropped and counted in ``report.dropped_no_trainable``.
    """
    report = report or DataReport()
    features = []
    for messages in examples:
        report.records += 1
        feat = tokenize_conversation(tokenizer, template, messages)
        cut = cutoff_len is not None and len(feat["input_ids"]) > cutoff_len
        if cut:
            feat = {k: v[:cutoff_len] for k, v in feat.items()}
        if n_trainable(feat) == 0:
            report.dropped_no_trainable += 1
            continue
        report.truncated += cut
        features.append(feat)
    return features, report


def split_train_val(items: list, val_size: float | int, seed: int = 0) -> tuple[list, list]:
    """Hold out ``val_size`` items: a fraction if < 1, else a count. Same seed, same split."""
    if val_size < 0 or (isinstance(val_size, float) and not val_size.is_integer() and val_size >= 1):
        raise ValueError(f"val_size must be a fraction in [0, 1) or a count, got {val_size}")
    n_val = round(len(items) * val_size) if val_size < 1 else int(val_size)
    if n_val >= len(items) and n_val > 0:
        raise ValueError(f"val_size={val_size} leaves no training data out of {len(items)} examples")
    picked = set(random.Random(seed).sample(range(len(items)), n_val))
    train = [x for i, x in enumerate(items) if i not in picked]
    val = [x for i, x in enumerate(items) if i in picked]
    return train, val


def pack(features: list[dict], block_size: int) -> list[dict]:
    """Concatenate examples end to end and cut into ``block_size`` blocks (the last may be short).

    Padding wastes compute on short samples; packing fills every row. Labels travel with their
    tokens, so each example still trains only on its replies. An example's first label is its
    (masked) prompt, so no block learns to predict one example from the end of another; the
    examples do attend to each other within a block, the usual price of this simple packing.
    """
    ids = [t for f in features for t in f["input_ids"]]
    labels = [t for f in features for t in f["labels"]]
    return [{"input_ids": ids[i:i + block_size], "labels": labels[i:i + block_size]}
            for i in range(0, len(ids), block_size)]


class PaddingCollator:
    """Batch features of different lengths into ``input_ids``, ``attention_mask``, ``labels``.

    Right padding for training (the real tokens keep positions 0..n-1); ``side="left"`` for
    batched generation. Padding positions get ``attention_mask`` 0 and label -100, so the pad
    id itself never matters; tokenizers without a pad token use their EOS id.
    """

    def __init__(self, tokenizer=None, pad_id: int | None = None, side: str = "right"):
        if pad_id is None:
            pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        if side not in ("left", "right"):
            raise ValueError("side must be 'left' or 'right'")
        self.pad_id, self.side = pad_id, side

    def _pad(self, seq: list[int], n: int, value: int) -> list[int]:
        fill = [value] * (n - len(seq))
        return seq + fill if self.side == "right" else fill + seq

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in batch)
        out = {
            "input_ids": [self._pad(f["input_ids"], n, self.pad_id) for f in batch],
            "attention_mask": [self._pad([1] * len(f["input_ids"]), n, 0) for f in batch],
        }
        if all("labels" in f for f in batch):
            out["labels"] = [self._pad(f["labels"], n, IGNORE_INDEX) for f in batch]
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def check_cutoff_len(cutoff_len: int | None, model, model_dir) -> None:
    """``cutoff_len`` must fit the model's context (``max_position_embeddings`` in its config.json).

    Longer examples would train positions the model never learnt, silently: RoPE computes angles
    for any position. Prompt and prefix tuning's virtual tokens take positions before the real ones.
    """
    context = model.config.max_position_embeddings
    virtual = getattr(model, "num_virtual_tokens", 0)
    if cutoff_len and cutoff_len + virtual > context:
        with_virtual = f", less the adapter's {virtual} virtual tokens" if virtual else ""
        raise UserError(f"cutoff_len: {cutoff_len} is longer than the model's context: "
                        f"{Path(model_dir) / 'config.json'} has max_position_embeddings {context} "
                        f"(expected cutoff_len <= {context - virtual}{with_virtual})")


@dataclass
class SFTData:
    train: list[dict]
    val: list[dict]
    report: DataReport


def prepare_sft(data, tokenizer, template: str | Template, cutoff_len: int = 1024,
                val_size: float | int = 0, seed: int = 0, packing: bool = False,
                fmt: str = "auto", skip_bad: bool = False) -> SFTData:
    """File (or list of message lists) to train / val features, with a report of all counts.

    The split happens before packing so no validation example leaks into a training block.
    """
    if packing and not cutoff_len:
        raise ValueError("packing needs cutoff_len: it is the length of the packed blocks")
    report = DataReport()
    if isinstance(data, (str, Path)):
        loaded = load_examples(data, fmt=fmt, skip_bad=skip_bad)
        report.skipped_bad = len(loaded.skipped)
        data = loaded.examples
    features, report = tokenize_all(data, tokenizer, template, cutoff_len, report)
    train, val = split_train_val(features, val_size, seed)
    if packing:
        train = pack(train, cutoff_len)
    report.train, report.val = len(train), len(val)
    log.info("SFT data: %s", report.summary())
    return SFTData(train, val, report)


# ----------------------------------------------------------------------------- preference pairs


def tokenize_preference(tokenizer, template: str | Template, example: PreferenceExample,
                        cutoff_len: int | None = None) -> dict | None:
    """Prompt + chosen and prompt + rejected, labels only on each response.

    Returns ``None`` when truncation leaves either side with no response tokens (the pair
    would compare two empty answers); callers count those.
    """
    out = {}
    for side in ("chosen", "rejected"):
        reply = {"role": "assistant", "content": getattr(example, side)}
        feat = tokenize_conversation(tokenizer, template, example.prompt + [reply])
        if cutoff_len is not None:
            feat = {k: v[:cutoff_len] for k, v in feat.items()}
        if n_trainable(feat) == 0:
            return None
        out[f"{side}_input_ids"], out[f"{side}_labels"] = feat["input_ids"], feat["labels"]
    return out


class PreferenceCollator:
    """Pad chosen and rejected sides separately: ``chosen_input_ids``, ``chosen_attention_mask``..."""

    def __init__(self, tokenizer=None, pad_id: int | None = None):
        self.pad = PaddingCollator(tokenizer, pad_id)

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = {}
        for side in ("chosen", "rejected"):
            part = self.pad([{"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]}
                             for f in batch])
            out.update({f"{side}_{k}": v for k, v in part.items()})
        return out


# ----------------------------------------------------------------------------- for lessons


def show_loss_mask(tokenizer, example: dict, file=None) -> str:
    """Print each token of a feature and whether the loss trains on it; returns the table."""
    ids, labels = [int(x) for x in example["input_ids"]], [int(x) for x in example["labels"]]  # lists or tensors
    rows = [f"{'pos':>5} {'id':>7}  train  token"]
    for i, (tok, lab) in enumerate(zip(ids, labels)):
        mark = "  ✓  " if lab != IGNORE_INDEX else "  ·  "
        rows.append(f"{i:>5} {tok:>7}  {mark}  {tokenizer.decode([tok])!r}")
    rows.append(f"{sum(lab != IGNORE_INDEX for lab in labels)} of {len(ids)} tokens trained")
    table = "\n".join(rows)
    print(table, file=file)
    return table
