"""Lesson 01: tokenization. Read README.md beside this file; every number below is measured here.

    python lessons/01-tokenization/run.py [--model weights/tiny] [--fast]
"""
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import regex
import sentencepiece as spm

from minitune.classroom.lesson import finish, parse_args, section, train_small_bpe
from minitune.data import TEMPLATES, render, show_loss_mask, tokenize_conversation
from minitune.tokenizer import load_tokenizer
from minitune.tokenizer.bpe import bytes_to_unicode
from minitune.tokenizer.bpe_trainer import LLAMA3_PATTERN, QWEN2_PATTERN, count_words
from minitune.tokenizer.pre_tokenizer import GPT2_PATTERN
from minitune.tokenizer.sample_text import mixed_text


def train_a_bpe(n_chars: int, vocab: int):
    """Section 1: train the BPE, show its first merges, replay them on one word. Returns (corpus, tokenizer)."""
    section(f"1. Training a byte-level BPE on {n_chars:,} characters of mixed text (vocab {vocab})")
    corpus = mixed_text(n_chars, seed=0)
    start = time.perf_counter()
    tok = train_small_bpe(n_chars, vocab)
    print(f"trained in {time.perf_counter() - start:.2f} s: 256 byte symbols + "
          f"{len(tok.backend.ranks)} merges + {len(tok.backend.added)} special tokens")
    words = count_words([corpus], QWEN2_PATTERN)
    print(f"the corpus splits into {sum(words.values()):,} pre-tokens, {len(words):,} distinct; most frequent:")
    print("   ", ", ".join(f"{w!r}x{c}" for w, c in words.most_common(8)))
    merges = sorted(tok.backend.ranks, key=tok.backend.ranks.get)
    print("first 12 merges (rank: left + right -> new symbol; Ġ is the space byte, Ċ the newline):")
    for r, (a, b) in enumerate(merges[:12]):
        print(f"   {r:>3}: {a!r:>8} + {b!r:<8} -> {a + b!r}")
    print("last 4 merges:", ", ".join(f"{a + b!r}" for a, b in merges[-4:]))
    print("merging ' training' step by step (lowest rank first):")
    trace(tok, " training")
    sentence = "Fine-tuning adapts a pretrained model: 12345 steps, 你好!"
    ids = tok.encode(sentence)
    print(f"{sentence!r} -> {len(ids)} tokens: {[readable(tok, i) for i in ids]}")
    assert tok.decode(ids) == sentence
    print("decode(encode(text)) == text: True")
    return corpus, tok


def trace(tok, word: str) -> None:
    """Apply the merges one at a time, as the BPE merge loop does, and print each step."""
    byte_char = bytes_to_unicode()
    parts = [byte_char[b] for b in word.encode("utf-8")]
    print(f"   {' '.join(parts)}")
    while True:
        ranked = [(tok.backend.ranks[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in tok.backend.ranks]
        if not ranked:
            break
        rank, i = min(ranked)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        print(f"   {' '.join(parts):<40} (merge rank {rank})")


def readable(tok, i: int) -> str:
    """A byte-level token as text, or as <hex bytes> when it is only part of a UTF-8 character."""
    raw = bytes(tok.backend.byte_decoder.get(c, 0) for c in tok.id_to_token(i))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "<" + raw.hex(" ") + ">"


def pre_tokenizer(model: str) -> None:
    """Section 2: the regex (the tiny model's, when it is there) beside GPT-2's and LLaMA-3's."""
    section("2. The pre-tokenizer regex: where a token may never cross")
    tiny_json = Path(model) / "tokenizer.json"
    pattern, source = QWEN2_PATTERN, "minitune/tokenizer/bpe_trainer.py (Qwen2's)"
    if tiny_json.is_file():
        pre = json.loads(tiny_json.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
        for p in pre.get("pretokenizers", [pre]):
            if p.get("type") == "Split" and "Regex" in p.get("pattern", {}):
                pattern, source = p["pattern"]["Regex"], str(tiny_json)
    print(f"pattern from {source}:\n    {pattern}")
    print("same as Qwen2's:", pattern == QWEN2_PATTERN)
    examples = {
        "code": "def f(x):\n    return x**2  # square",
        "numbers": "In 2024 we sold 1234567 units at $3.50",
        "Chinese": "大模型微调很有趣。我有3个apple",
        "contractions": "We'll see THEY'RE right, it's fine",
        "spaces": "a   b\n\n\tc",
    }
    for name, text in examples.items():
        print(f"\n{name}: {text!r}")
        for label, pat in (("GPT-2", GPT2_PATTERN), ("LLaMA-3", LLAMA3_PATTERN), ("Qwen2", pattern)):
            pieces = regex.findall(pat, text)
            print(f"   {label:8} {len(pieces):>2} pieces: {pieces}")


def sentencepiece_vs_bpe(corpus: str, tok, vocab: int) -> None:
    """Section 3: a SentencePiece BPE with byte fallback, trained on the same corpus to the same size."""
    section("3. SentencePiece (LLaMA-2 style, byte fallback) vs byte-level BPE, same corpus, same size")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.txt").write_text(corpus, encoding="utf-8")
        start = time.perf_counter()
        spm.SentencePieceTrainer.train(input=str(Path(tmp) / "corpus.txt"), model_prefix=str(Path(tmp) / "sp"),
                                       vocab_size=vocab, model_type="bpe", byte_fallback=True, character_coverage=0.98,
                                       split_digits=True, remove_extra_whitespaces=False, max_sentence_length=100_000,
                                       minloglevel=2, num_threads=2)
        print(f"sentencepiece trained in {time.perf_counter() - start:.2f} s")
        sp_tok = load_tokenizer(Path(tmp) / "sp.model")
    for text in ("Hello world, tokenizers split text.", "你好世界 😀", "    return x  # four spaces"):
        bpe_ids, sp_ids = tok.encode(text), sp_tok.encode(text)
        print(f"\n{text!r}")
        print(f"   byte-level BPE {len(bpe_ids):>2} tokens: {[tok.id_to_token(i) for i in bpe_ids]}")
        print(f"      (as text:  {[readable(tok, i) for i in bpe_ids]})")
        print(f"   sentencepiece  {len(sp_ids):>2} tokens: {[sp_tok.id_to_token(i) for i in sp_ids]}")
        print(f"   both decode back exactly: {tok.decode(bpe_ids) == text and sp_tok.decode(sp_ids) == text}")
    sample = mixed_text(5_000, seed=9)
    print(f"\nheld-out mixed text ({len(sample)} chars): byte-level {len(tok.encode(sample))} tokens, "
          f"sentencepiece {len(sp_tok.encode(sample))} tokens")


def chat_templates() -> None:
    """Section 4: one conversation rendered by each template, with the generation prompt appended."""
    section("4. Chat templates: one conversation, six layouts (ChatML, LLaMA-2, LLaMA-3, Alpaca, ChatGLM, Human/Assistant)")
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Japan?"}]
    for name in ("chatml", "llama2", "llama3", "alpaca", "chatglm", "human_assistant"):
        # ChatGLM-6B has no system role, so it gets the conversation without one
        text = TEMPLATES[name].render(messages[1:] if name == "chatglm" else messages, add_generation_prompt=True)
        print(f"--- {name} (generation prompt appended; stop at {TEMPLATES[name].stop!r})\n{text}")


def loss_mask(model: str, tok) -> None:
    """Section 5: which tokens of a two-turn dialogue SFT trains on (the tiny model's tokenizer, if there)."""
    section("5. The loss mask: which tokens SFT trains on")
    model_tok = None
    if (Path(model) / "tokenizer.json").is_file() or (Path(model) / "tokenizer.model").is_file():
        model_tok = load_tokenizer(model)
        print(f"tokenizer: {model}")
    if model_tok is None or model_tok.token_to_id("<|im_start|>") is None:
        model_tok = tok
        print("tokenizer: the BPE trained in section 1 (it has the ChatML special tokens)")
    dialogue = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "Reverse: cat sun"}, {"role": "assistant", "content": "sun cat"}]
    feature = tokenize_conversation(model_tok, "chatml", dialogue)
    print(render("chatml", dialogue))
    show_loss_mask(model_tok, feature)
    counts = Counter(label != -100 for label in feature["labels"])
    print(f"labels: {counts[True]} trained (the replies and their <|im_end|>), {counts[False]} masked with -100")


def main():
    args = parse_args(__doc__)
    n_chars, vocab = (20_000, 800) if args.fast else (300_000, 1500)
    corpus, tok = train_a_bpe(n_chars, vocab)
    pre_tokenizer(args.model)
    sentencepiece_vs_bpe(corpus, tok, vocab)
    chat_templates()
    loss_mask(args.model, tok)
    finish("01")


if __name__ == "__main__":
    main()
