"""Train a byte-level BPE vocabulary and write it as a HF ``tokenizer.json``.

The algorithm is Sennrich et al. (2016) on GPT-2's byte alphabet (Radford et
al., 2019):

1. cut the corpus into pre-tokens with the split regex (Qwen2's by default) and
   count each distinct pre-token ("word") once, with its frequency;
2. start from the 256 byte symbols, so every string stays encodable;
3. repeatedly take the adjacent symbol pair that occurs most often (weighted by
   word frequency), add the joined symbol to the vocabulary and record the
   merge, until the vocabulary reaches ``vocab_size``.

Recounting every pair after each merge would cost a pass over the corpus per
merge. Instead we keep the pair counts and, for each pair, the words it occurs
in; a merge only touches those words, and a max-heap with lazy deletion (stale
entries are skipped when popped) finds the next most frequent pair.

The merges are written in rank order, which is exactly the order the encoder
(:mod:`minitune.tokenizer.bpe`, or HF ``tokenizers``) applies them in.
"""
from __future__ import annotations

import heapq
import unicodedata
from collections import Counter, defaultdict
from typing import Iterable

import regex
from tqdm import tqdm

from . import Tokenizer
from .bpe import ByteLevelBPE, bytes_to_unicode

# The pre-tokenizer regexes of Qwen2/2.5/3 and LLaMA-3 (the latter keeps up to three digits together).
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def count_words(texts: Iterable[str], pattern: str, special_tokens=(), nfc=True) -> Counter:
    """Pre-token -> how often it occurs. Special tokens are cut out so no merge ever spans one."""
    split_re = regex.compile(pattern)
    special_re = regex.compile("|".join(map(regex.escape, sorted(special_tokens, key=len, reverse=True)))) \
        if special_tokens else None
    counts: Counter = Counter()
    for text in texts:
        for chunk in special_re.split(text) if special_re else (text,):
            if nfc:
                chunk = unicodedata.normalize("NFC", chunk)
            counts.update(split_re.findall(chunk))
    return counts


def learn_merges(word_counts: Counter, n_merges: int, min_frequency: int = 2,
                 progress: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn up to ``n_merges`` merges. Returns (symbols, merges); symbols[i] is token id i."""
    byte_char = bytes_to_unicode()
    symbols = [byte_char[b] for b in range(256)]  # id b is byte b
    symbol_id = {s: i for i, s in enumerate(symbols)}
    words = [[b for b in w.encode("utf-8")] for w in word_counts]
    freqs = list(word_counts.values())

    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += f
            pair_words[pair].add(w)

    # Max-heap via negated counts; ties go to the pair whose strings sort first, so runs repeat.
    def entry(pair):
        return (-pair_count[pair], symbols[pair[0]], symbols[pair[1]], pair)
    heap = [entry(p) for p in pair_count]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    bar = tqdm(total=n_merges, disable=not progress, desc="bpe merges")
    while heap and len(merges) < n_merges:
        neg, _, _, pair = heapq.heappop(heap)
        if -neg != pair_count.get(pair, 0):
            continue  # stale: the count changed after this entry was pushed
        if -neg < min_frequency:
            break
        a, b = pair
        joined = symbols[a] + symbols[b]
        # Two different pairs can spell the same string ("ab"+"c", "a"+"bc"); they share one id.
        new = symbol_id.setdefault(joined, len(symbols))
        if new == len(symbols):
            symbols.append(joined)
        merges.append((symbols[a], symbols[b]))
        bar.update()

        # Only the pairs next to a merged occurrence change: (x, a) becomes (x, new) and
        # (b, y) becomes (new, y). Everything else in the word keeps its count.
        changed = set()

        def move(old, new_pair, f, w):
            if old != pair:  # the merged pair itself is dropped as a whole below
                pair_count[old] -= f
                changed.add(old)
            pair_count[new_pair] += f
            pair_words[new_pair].add(w)
            changed.add(new_pair)

        for w in pair_words.pop(pair):
            word, f, n = words[w], freqs[w], len(words[w])
            out, i = [], 0
            while i < n:
                if i + 1 < n and word[i] == a and word[i + 1] == b:
                    if out:
                        move((word[i - 1], a), (out[-1], new), f, w)
                    # The right neighbour is handled here unless it starts the next merge,
                    # whose left-neighbour step above then accounts for it.
                    if i + 2 < n and not (i + 3 < n and word[i + 2] == a and word[i + 3] == b):
                        move((b, word[i + 2]), (new, word[i + 2]), f, w)
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[w] = out
        pair_count.pop(pair, None)
        for p in changed:
            if pair_count.get(p, 0) > 0:
                heapq.heappush(heap, entry(p))
            else:
                pair_count.pop(p, None)
    bar.close()
    return symbols, merges


def tokenizer_json(symbols: list[str], merges: list[tuple[str, str]], special_tokens=(),
                   pattern: str = QWEN2_PATTERN, nfc: bool = True) -> dict:
    """The ``tokenizer.json`` layout that HF ``tokenizers`` reads (Qwen2-style pipeline)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [{"id": len(symbols) + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for k, t in enumerate(special_tokens)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"} if nfc else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {s: i for i, s in enumerate(symbols)}, "merges": [list(m) for m in merges]},
    }


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens=("<|endoftext|>",), pattern: str = QWEN2_PATTERN,
              nfc: bool = True, min_frequency: int = 2, eos_token: str | None = None, pad_token: str | None = None,
              bos_token: str | None = None, progress: bool = False) -> Tokenizer:
    """Learn a byte-level BPE of ``vocab_size`` ids (256 bytes + merges + special tokens).

    ``tok.save(directory)`` then writes tokenizer.json and tokenizer_config.json.
    The eos/pad/bos tokens, if given, must be among ``special_tokens``.
    """
    special_tokens = list(special_tokens)
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 byte symbols + {len(special_tokens)} special tokens")
    for name, t in (("eos_token", eos_token), ("pad_token", pad_token), ("bos_token", bos_token)):
        if t is not None and t not in special_tokens:
            raise ValueError(f"{name} {t!r} is not one of special_tokens {special_tokens}")
    counts = count_words(texts, pattern, special_tokens, nfc)
    symbols, merges = learn_merges(counts, n_merges, min_frequency, progress)
    # When two pairs spelled the same string, fewer ids than merges were made; vocab_size is an upper bound.
    spec = tokenizer_json(symbols, merges, special_tokens, pattern, nfc)
    backend = ByteLevelBPE(spec, where="trained tokenizer")
    ids = {f"{k}_id": backend.token_to_id(t) if t else None
           for k, t in (("eos", eos_token), ("pad", pad_token), ("bos", bos_token))}
    config = {"model_max_length": 1 << 30, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return Tokenizer(backend, config=config, **ids)
