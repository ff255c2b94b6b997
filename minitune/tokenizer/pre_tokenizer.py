"""The pre-tokenizer: how text is cut into pieces before BPE runs, read from ``tokenizer.json``.

Steps 2 and 3 of the encode pipeline in bpe.py. No BPE merge ever crosses a piece ("pre-token")
boundary, so the cut decides which tokens can exist at all: whether " model" is one word with
its space, whether "2024" is one piece or four digits. A ``tokenizer.json`` describes the cut in
two parts, and we read both rather than hard-code them:

* ``normalizer``: a unicode normal form applied first (NFC for Qwen; none for LLaMA-3), so the
  same text typed two ways gives the same ids;
* ``pre_tokenizer``: a ``Split`` with the model's regex (Qwen2, LLaMA-3), or a ``ByteLevel``
  with ``use_regex`` that splits with GPT-2's regex, optionally after ``add_prefix_space``.

A feature outside that (another normalizer, a Split that removes the matches) is refused with
the file named, rather than encoded differently from the model's own tokenizer.
"""
from __future__ import annotations

import unicodedata

import regex

from ..errors import UserError

# The regex that a ByteLevel pre-tokenizer with use_regex=true applies (GPT-2's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerFileError(UserError):
    """A tokenizer file is missing a part, or uses a feature we do not implement."""


def read_normalizer(spec: dict | None, where: str):
    """Return a str -> str function for the file's normalizer (unicode forms only)."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s: unicodedata.normalize(kind, s)
    if kind == "Sequence":
        steps = [f for f in (read_normalizer(s, where) for s in spec.get("normalizers", [])) if f]
        if not steps:
            return None

        def run(s: str) -> str:
            for f in steps:
                s = f(s)
            return s
        return run
    raise TokenizerFileError(f"{where}: normalizer {kind!r} is not supported (only NFC/NFD/NFKC/NFKD or none)")


def read_pre_tokenizer(spec: dict | None, where: str) -> list:
    """Read the pre-tokenizer into its steps, in order: ("split", regex) or ("prefix", None)."""
    if spec is None:
        raise TokenizerFileError(f"{where}: no pre_tokenizer; byte-level BPE needs a ByteLevel pre-tokenizer")
    parts = spec["pretokenizers"] if spec.get("type") == "Sequence" else [spec]
    steps, byte_level = [], False
    for p in parts:
        kind = p.get("type")
        if kind == "Split":
            if p.get("behavior") != "Isolated" or p.get("invert"):
                raise TokenizerFileError(f"{where}: Split behavior {p.get('behavior')!r}/invert={p.get('invert')} "
                                         "is not supported (only Isolated, invert=false)")
            pat = p["pattern"]
            # A "String" pattern is a literal; a "Regex" one is Oniguruma syntax, which the
            # `regex` package reads the same way for the patterns these models use.
            steps.append(("split", regex.compile(regex.escape(pat["String"]) if "String" in pat else pat["Regex"])))
        elif kind == "ByteLevel":
            byte_level = True
            if p.get("add_prefix_space", False):
                steps.append(("prefix", None))
            if p.get("use_regex", True):
                steps.append(("split", regex.compile(GPT2_PATTERN)))
        else:
            raise TokenizerFileError(f"{where}: pre-tokenizer {kind!r} is not supported (Split and ByteLevel only)")
    if not byte_level:
        raise TokenizerFileError(f"{where}: not a byte-level BPE (no ByteLevel pre-tokenizer)")
    return steps


def pre_tokenize(text: str, steps: list) -> list[str]:
    """Cut (already normalized) text into pre-tokens by the steps of `read_pre_tokenizer`, in order."""
    pieces = [text]
    for kind, pat in steps:
        if kind == "prefix":  # GPT-2's add_prefix_space: "Hello" is then cut like " Hello"
            pieces = [p if p.startswith(" ") else " " + p for p in pieces]
        else:
            pieces = [p for piece in pieces for p in split_isolated(pat, piece)]
    return pieces


def split_isolated(pat: regex.Pattern, text: str) -> list[str]:
    """Split ``text`` into the regex matches plus the gaps between them ("Isolated")."""
    found = None if pat.groups else pat.findall(text)  # findall gives groups, not matches, if any
    if found is not None and sum(map(len, found)) == len(text):  # the usual case: the matches cover everything
        return found
    out, pos = [], 0
    for m in pat.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append(m.group())
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out
