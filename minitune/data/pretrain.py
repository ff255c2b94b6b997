"""Raw text for continued pretraining (stage pt): documents -> equal blocks of cutoff_len tokens.

Pretraining has no prompt and no reply: every token is a target of the next-token loss,

    loss = -1/N sum_t log p(x_{t+1} | x_<=t)        over all N next-token pairs of a block.

Documents are read from a `.txt` file (each non-blank line one document, as LLaMA-Factory's text
loader reads it) or JSON / JSONL records with a `text` field (LLaMA-Factory's c4_demo; another
field when dataset_info.json maps `columns: {"prompt": ...}` to it). As in LLaMA-Factory's
pretraining preprocessing, each document is tokenised without special tokens and ended with the
EOS token, all of them are concatenated, and the stream is cut into blocks of exactly cutoff_len
tokens; the incomplete block at the end is dropped. No padding is ever needed, and the EOS tokens
tell the model where one document stops and the next begins (the blocks do not reset attention at
those boundaries, the usual price of packing; see dataset.pack for the SFT version).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .dataset import split_train_val
from .formats import DataError, RecordError, iter_records, read_utf8

__all__ = ["read_texts", "token_stream", "pack_texts", "PretrainData", "prepare_pretrain"]


def read_texts(path: str | Path, column: str = "text", max_samples: int | None = None) -> list[str]:
    """The documents of one file: .txt lines, or the `column` field of each JSON / JSONL record."""
    path = Path(path)
    if path.suffix == ".txt":
        texts = [line for line in read_utf8(path).split("\n") if line.strip()]
        return texts[:max_samples] if max_samples is not None else texts
    texts = []
    for line, rec in iter_records(path):
        if isinstance(rec, RecordError):
            raise DataError(f"{path} line {line}: {rec}")
        if not isinstance(rec, dict) or not isinstance(rec.get(column), str):
            got = f"fields {', '.join(sorted(rec))}" if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{path} line {line}: stage pt reads raw text from a string field {column!r} "
                            f"(got {got})")
        texts.append(rec[column])
        if max_samples is not None and len(texts) >= max_samples:
            break
    return texts


def token_stream(texts: list[str], tokenizer) -> list[int]:
    """Each text's ids (no special tokens added) followed by EOS, all concatenated."""
    if tokenizer.eos_id is None:
        raise DataError("stage pt: the tokenizer has no EOS token to end each document with")
    return [t for text in texts for t in tokenizer.encode(text) + [tokenizer.eos_id]]


def pack_texts(texts: list[str], tokenizer, block_size: int, stream: list[int] | None = None) -> list[dict]:
    """The token stream cut into full blocks: [{"input_ids", "labels"}], labels = input_ids."""
    stream = token_stream(texts, tokenizer) if stream is None else stream
    n_blocks = len(stream) // block_size  # the last, incomplete block is dropped
    return [{"input_ids": stream[i * block_size:(i + 1) * block_size],
             "labels": stream[i * block_size:(i + 1) * block_size]} for i in range(n_blocks)]


@dataclass
class PretrainData:
    train: list[dict]
    val: list[dict]
    documents: int
    tokens: int  # in the token stream, before the last incomplete block was dropped

    def summary(self) -> str:
        blocks = len(self.train) + len(self.val)
        width = len(self.train[0]["input_ids"]) if self.train else 0
        return (f"{self.documents} documents, {self.tokens} tokens -> {blocks} blocks of {width} "
                f"({self.tokens - blocks * width} tokens at the end dropped); train {len(self.train)}, val {len(self.val)}")


def prepare_pretrain(texts: list[str], tokenizer, cutoff_len: int, val_size: float | int = 0, seed: int = 0
                     ) -> PretrainData:
    """Pack the documents into cutoff_len blocks and hold out val_size of the blocks."""
    stream = token_stream(texts, tokenizer)
    blocks, tokens = pack_texts(texts, tokenizer, cutoff_len, stream), len(stream)
    if not blocks:
        raise DataError(f"stage pt: the raw text holds {tokens} tokens, fewer than one block of cutoff_len "
                        f"{cutoff_len}; add text or lower cutoff_len")
    train, val = split_train_val(blocks, val_size, seed)
    return PretrainData(train, val, len(texts), tokens)
