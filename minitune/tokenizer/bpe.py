"""Byte-level BPE, read from a Hugging Face ``tokenizer.json``.

Byte-pair encoding (Sennrich, Haddow & Birch, 2016) splits a word into symbols
and repeatedly joins the adjacent pair that was learned earliest (lowest merge
rank) until no learned pair is left. GPT-2 (Radford et al., 2019) made it
"byte-level": text is first turned into UTF-8 bytes, and each of the 256 bytes
is shown as one printable unicode character, so every string can be encoded
without an unknown token. Qwen2/2.5/3 and LLaMA-3 use this scheme.

The encode pipeline, in the order ``tokenizers`` applies it:

1. cut out added/special tokens (``<|im_start|>``...), longest match first;
2. normalize each remaining piece (NFC for Qwen, nothing for LLaMA-3);
3. pre-tokenize: split with the regex stored in the file (``Split``), or the
   GPT-2 regex for a plain ``ByteLevel`` pre-tokenizer with ``use_regex``
   (steps 2 and 3 are read and run by pre_tokenizer.py);
4. map each pre-token's bytes to their printable characters;
5. run BPE merges on each pre-token (cached: words repeat a lot).

Decoding joins the tokens, maps the characters back to bytes and decodes
UTF-8 with ``errors="replace"``, as the ``ByteLevel`` decoder does.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import regex

# TokenizerFileError is defined there (this file imports that one, not the other way round), so the
# pre-tokenizer reader and the BPE reader below raise the same error.
from .pre_tokenizer import TokenizerFileError, pre_tokenize, read_normalizer, read_pre_tokenizer


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table.

    Bytes that are already visible, non-space characters keep their own code
    point; the other 68 (controls, space, 0x7F-0xA0, 0xAD) are moved to 256+n
    so that no token string contains whitespace or invisible characters.
    """
    # BEGIN EXERCISE 01.2: the byte-to-unicode table
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table
    # END EXERCISE


_NEVER = float("inf")


def _read_merges(raw: list, where: str) -> list[tuple[str, str]]:
    merges = []
    for i, m in enumerate(raw):
        # Older files write "a b"; tokenizers >= 0.20 writes ["a", "b"].  Byte-level
        # tokens never contain a real space (it is shown as "Ġ"), so splitting is safe.
        pair = m.split(" ") if isinstance(m, str) else m
        if len(pair) != 2:
            raise TokenizerFileError(f"{where}: merge #{i} {m!r} is not a pair")
        merges.append((pair[0], pair[1]))
    return merges


class ByteLevelBPE:
    """Encoder/decoder for one ``tokenizer.json`` (model type BPE, ByteLevel pre-tokenizer)."""

    def __init__(self, spec: dict, where: str = "tokenizer.json"):
        self.spec = spec  # kept whole so save() writes back exactly what was read
        model = spec.get("model") or {}
        if model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
            raise TokenizerFileError(f"{where}: model must be type BPE with 'vocab' and 'merges'")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise TokenizerFileError(f"{where}: BPE {key}={model[key]!r} is not supported")
        if model.get("dropout"):
            raise TokenizerFileError(f"{where}: BPE dropout is for training only; set it to null")
        dec = spec.get("decoder")
        if dec is None or dec.get("type") != "ByteLevel":
            raise TokenizerFileError(f"{where}: decoder must be ByteLevel, got {dec and dec.get('type')!r}")

        self.vocab: dict[str, int] = dict(model["vocab"])
        # LLaMA-3 sets ignore_merges: a pre-token that is itself in the vocabulary is
        # taken whole, even if the merges would have cut it differently.
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.unk_id = self.vocab.get(model["unk_token"]) if model.get("unk_token") else None
        merges = _read_merges(model["merges"], where)
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        for a, b in merges:
            if a + b not in self.vocab:
                raise TokenizerFileError(f"{where}: merge {a!r} + {b!r} gives {a + b!r}, which is not in the vocab")
        self.normalize = read_normalizer(spec.get("normalizer"), where)
        self.pre_steps = read_pre_tokenizer(spec.get("pre_tokenizer"), where)

        self.added: dict[str, int] = {}     # added token text -> id
        self.special_ids: set[int] = set()
        self.added_opts: dict[str, dict] = {}
        for t in spec.get("added_tokens") or []:
            self.added[t["content"]] = t["id"]
            self.added_opts[t["content"]] = t
            if t.get("special"):
                self.special_ids.add(t["id"])
        # Python's regex alternation takes the first alternative that matches, so
        # listing longer tokens first gives leftmost-longest matching, like the
        # Aho-Corasick automaton in `tokenizers`.
        alts = sorted(self.added, key=len, reverse=True)
        self.added_re = regex.compile("|".join(regex.escape(a) for a in alts)) if alts else None

        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.id_to_token.update({i: t for t, i in self.added.items()})
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache: dict[str, list[int]] = {}  # pre-token text -> ids
        self.cache_limit = 500_000  # bounds memory on endless unique input; 0 turns the cache off

    @classmethod
    def from_file(cls, path: str | Path) -> "ByteLevelBPE":
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerFileError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(spec, dict) or "model" not in spec:
            raise TokenizerFileError(f"{path}: not a tokenizer.json (no 'model' section)")
        return cls(spec, where=str(path))

    @property
    def vocab_size(self) -> int:
        return max(self.id_to_token) + 1

    # ---------------------------------------------------------------- encode
    def bpe(self, word: str) -> list[int]:
        """Merge one pre-token (already byte-mapped) into token ids."""
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        # BEGIN EXERCISE 01.1: the BPE merge loop
        parts = list(word)
        while len(parts) > 1:
            # The learned-earliest pair among the neighbours (a pair never learned ranks last).
            ranks = [self.ranks.get(pair, _NEVER) for pair in zip(parts, parts[1:])]
            best_rank = min(ranks)
            if best_rank == _NEVER:
                break
            best = ranks.index(best_rank)  # leftmost on ties, as in tokenizers
            a, b = parts[best], parts[best + 1]
            # Join every non-overlapping (a, b) left to right: same result as merging them one
            # by one, since no other pair has a lower rank than this one.
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        # END EXERCISE
        ids = []
        for p in parts:
            if p in self.vocab:
                ids.append(self.vocab[p])
            elif self.unk_id is not None:
                ids.append(self.unk_id)
            else:
                raise KeyError(f"symbol {p!r} is not in the vocabulary and the model has no unk_token")
        return ids

    def _encode_plain(self, text: str, out: list[int]) -> None:
        """Encode text that holds no added token."""
        if self.normalize:
            text = self.normalize(text)
        pieces = pre_tokenize(text, self.pre_steps)
        cache, enc = self.cache, self.byte_encoder
        for piece in pieces:
            ids = cache.get(piece)
            if ids is None:
                ids = self.bpe("".join(enc[b] for b in piece.encode("utf-8")))
                if len(cache) < self.cache_limit:
                    cache[piece] = ids
            out.extend(ids)

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Adds no BOS/EOS; added/special token strings become their ids."""
        out: list[int] = []
        segments = self.split_added(text)
        for seg, tok_id in segments:
            if tok_id is not None:
                out.append(tok_id)
            elif seg:
                self._encode_plain(seg, out)
        return out

    def split_added(self, text: str) -> list[tuple[str, int | None]]:
        """Cut text into [(plain text, None) | (added token, id)], honouring lstrip/rstrip/single_word."""
        if self.added_re is None:
            return [(text, None)]
        out: list[tuple[str, int | None]] = []
        pos = 0
        for m in self.added_re.finditer(text):
            opt = self.added_opts[m.group()]
            s, e = m.span()
            if opt.get("single_word") and ((s > 0 and _is_word(text[s - 1])) or (e < len(text) and _is_word(text[e]))):
                continue
            before = text[pos:s]
            if opt.get("lstrip"):
                before = before.rstrip()
            if out and out[-1][1] is not None and self.added_opts[out[-1][0]].get("rstrip"):
                before = before.lstrip()
            out.append((before, None))
            out.append((m.group(), self.added[m.group()]))
            pos = e
        rest = text[pos:]
        if out and self.added_opts[out[-1][0]].get("rstrip"):
            rest = rest.lstrip()
        out.append((rest, None))
        return out

    # ---------------------------------------------------------------- decode
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        raw = bytearray()
        for i in ids:
            tok = self.id_to_token.get(int(i))
            if tok is None:
                # An id the tokenizer does not have decodes to nothing, as in HF tokenizers: a model's
                # embedding often has more rows than its tokenizer has tokens (Qwen2.5: 151,936 rows,
                # 151,665 tokens), and a sampled padding row must not stop a chat or a lesson.
                continue
            if skip_special_tokens and int(i) in self.special_ids:
                continue
            # A token whose characters are all in the byte table is byte-mapped text; an
            # added token such as "<|im_start|>" maps to itself this way too. Anything
            # else (e.g. an added token holding a real space) is taken as plain UTF-8,
            # which is what the ByteLevel decoder of `tokenizers` does.
            try:
                raw.extend(self.byte_decoder[c] for c in tok)
            except KeyError:
                raw.extend(tok.encode("utf-8"))
        return raw.decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        return self.added.get(token, self.vocab.get(token))


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"
