"""SentencePiece models (``tokenizer.model``), as LLaMA-2 ships them.

SentencePiece (Kudo & Richardson, 2018) treats the text as one raw stream:
spaces become "▁" (U+2581) and are part of the pieces, a "▁" is put in front
of the text (the "dummy prefix"), and the pieces come from a BPE or unigram
model. LLaMA-2's model is BPE with *byte fallback*: a character that has no
piece is written as its UTF-8 bytes ``<0xE4><0xBD>...``, so nothing is unknown.

The piece search itself runs in the ``sentencepiece`` package (C++); this file
adds what ``transformers`` does around it: control tokens (``<s>``, ``</s>``)
and tokens added after training (``tokenizer_config.json``) are cut out of the
text first, longest match first, and the plain text between them is encoded
piece by piece (each with its own dummy prefix, like the "legacy" LLaMA
tokenizer).
"""
from __future__ import annotations

from pathlib import Path

import regex
import sentencepiece


class SentencePieceModel:
    """Encoder/decoder around one ``tokenizer.model`` file."""

    def __init__(self, path: str | Path, added: dict[str, int] | None = None, special: set[str] | None = None):
        self.path = Path(path)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a SentencePiece model ({e})") from e
        n = self.sp.get_piece_size()
        # Control pieces (<s>, </s>, <pad>) and <unk> never come out of sp.encode for plain
        # text, so, like transformers, we look for their spelling in the text ourselves.
        self.added = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.special_ids = set(self.added.values())
        for tok, i in (added or {}).items():
            self.added[tok] = i
            if special is None or tok in special:
                self.special_ids.add(i)
        self.id_to_added = {i: t for t, i in self.added.items()}
        alts = sorted(self.added, key=len, reverse=True)
        self.added_re = regex.compile("|".join(regex.escape(a) for a in alts)) if alts else None

    @property
    def vocab_size(self) -> int:
        return max([self.sp.get_piece_size() - 1, *self.id_to_added]) + 1

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Adds no BOS/EOS; control/added token strings become their ids."""
        out: list[int] = []
        pos = 0
        for m in self.added_re.finditer(text) if self.added_re else ():
            if m.start() > pos:
                out.extend(self.sp.encode(text[pos:m.start()]))
            out.append(self.added[m.group()])
            pos = m.end()
        if pos < len(text):
            out.extend(self.sp.encode(text[pos:]))
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        # sentencepiece drops control ids when decoding, so runs of ordinary ids go to it
        # and added/control tokens are written out (or skipped) here.
        parts, run = [], []
        size = self.vocab_size
        for i in map(int, ids):
            if not 0 <= i < size:
                continue  # an id beyond the tokenizer (a padded embedding row) decodes to nothing, as in bpe.py
            if i in self.id_to_added:
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                if not (skip_special_tokens and i in self.special_ids):
                    parts.append(self.id_to_added[i])
            else:
                run.append(i)
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        i = self.sp.piece_to_id(token)  # returns the unk id for an unknown piece
        return i if self.sp.id_to_piece(i) == token else None

    def special_id(self, kind: str) -> int | None:
        """The model's own bos/eos/pad/unk id, or None where it has none (-1)."""
        i = {"bos": self.sp.bos_id, "eos": self.sp.eos_id, "pad": self.sp.pad_id, "unk": self.sp.unk_id}[kind]()
        return i if i >= 0 else None

    def save_files(self, directory: Path) -> None:
        (directory / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())
