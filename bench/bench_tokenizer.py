"""Encode ~1 MB of mixed text: minitune's pure-Python byte-level BPE vs HF `tokenizers` (Rust).

Both run the same tokenizer.json (trained here with minitune's trainer unless
--tokenizer points at a real one, e.g. a Qwen2.5 or LLaMA-3 folder) on the same
reproducible text (English, Chinese, emoji, code, numbers, odd whitespace).

Timings are medians over several rounds; within a round the contenders
alternate so drifting machine load hits all of them alike:

* ours, no cache: every pre-token goes through the BPE merge loop;
* ours, cold cache: the cache starts empty, so only repeats within the text hit;
* ours, warm cache: the same text again, so every pre-token is a cache hit and
  what is left is the regex pre-tokenizer and list building;
* HF tokenizers: ``Tokenizer.encode`` on the whole string (one thread; its own
  BPE word cache stays warm across rounds);
* the same per line, ours (cold cache) and HF, for a data-pipeline-like call pattern.

Run:  python bench/bench_tokenizer.py [--mb 1.0] [--rounds 5] [--tokenizer DIR]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time

import torch

from minitune.tokenizer import load_tokenizer
from minitune.tokenizer.bpe_trainer import train_bpe
from minitune.tokenizer.sample_text import mixed_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=1.0, help="size of the text to encode, in MB of UTF-8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokenizer", help="folder with a tokenizer.json (default: train a 4k vocab here)")
    ap.add_argument("--vocab", type=int, default=4000)
    args = ap.parse_args()

    import tokenizers  # the benchmark's reference; minitune itself never imports it

    text = mixed_text(int(args.mb * 1e6 / 1.3), seed=20240601)  # ~1.3 bytes per char in this mix
    mb = len(text.encode("utf-8")) / 1e6

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.tokenizer
        if folder is None:
            corpus = mixed_text(2_000_000, seed=1)  # a different seed: the benchmark text is held out
            t0 = time.perf_counter()
            train_bpe([corpus[i:i + 10_000] for i in range(0, len(corpus), 10_000)], vocab_size=args.vocab,
                      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).save(tmp)
            print(f"trained tokenizer on {len(corpus.encode()) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
            folder = tmp
        ours = load_tokenizer(folder)
        hf = tokenizers.Tokenizer.from_file(f"{folder}/tokenizer.json")
    bpe = ours.backend

    def no_cache():
        bpe.cache.clear()
        limit, bpe.cache_limit = bpe.cache_limit, 0
        try:
            return ours.encode(text)
        finally:
            bpe.cache_limit = limit

    # The same text as its ~17k lines: how a data pipeline calls a tokenizer (many short calls).
    lines = text.splitlines(keepends=True)
    contenders = {
        "ours, no cache": no_cache,
        "ours, cold cache": lambda: (bpe.cache.clear(), ours.encode(text))[1],
        "ours, warm cache": lambda: ours.encode(text),  # runs right after the cold one
        "HF tokenizers": lambda: hf.encode(text, add_special_tokens=False).ids,
        "ours, per line, cold": lambda: (bpe.cache.clear(), [i for ln in lines for i in ours.encode(ln)])[1],
        "HF, per line": lambda: [i for ln in lines for i in hf.encode(ln, add_special_tokens=False).ids],
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    results = {}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    reference = results["HF tokenizers"]
    for name, ids in results.items():
        assert ids == (results["HF, per line"] if "per line" in name else reference), f"{name}: ids differ from HF"

    bpe.cache.clear()
    ours.encode(text)
    distinct = len(bpe.cache)  # what a cold run had to merge from scratch
    pieces = len(reference)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, tokenizers {tokenizers.__version__}")
    print(f"text: {mb:.2f} MB UTF-8, {len(text):,} chars -> {pieces:,} tokens (vocab {ours.vocab_size}); "
          f"{distinct:,} distinct pre-tokens; median of {args.rounds} alternating rounds")
    print(f"  (per line: {len(lines):,} calls; compared with HF per line)")
    for name, ts in times.items():
        med = statistics.median(ts)
        hf_med = statistics.median(times["HF, per line" if "per line" in name else "HF tokenizers"])
        print(f"  {name:22s} {med * 1e3:8.1f} ms  {mb / med:7.2f} MB/s  ({hf_med / med:.2f}x HF)")


if __name__ == "__main__":
    main()
