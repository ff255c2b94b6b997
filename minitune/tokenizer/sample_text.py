"""Reproducible mixed-language text for tokenizer tests, training demos and benchmarks.

Real tokenizers meet English, Chinese, emoji, source code, numbers and odd
whitespace (tabs, CRLF, runs of spaces) in the same stream; this builds such a
stream from a fixed seed so that every run sees the same bytes.
"""
from __future__ import annotations

import random

_ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning adapts a pretrained model to a new task with a small dataset.",
    "We'll see that they're right, it's what I'd expect and you've said.",
    "Low-rank adapters train two thin matrices instead of the whole weight.",
    "RLHF fits a reward model to human preferences, then optimises the policy.",
    "Tokenizers split text into pieces; the model only ever sees their ids.",
    "Learning rate warm-up avoids large, noisy updates at the start of training.",
]
_CHINESE = [
    "大模型微调是指在预训练模型的基础上使用特定数据集进行进一步训练。",
    "有监督微调让模型学会按照指令回答问题。",
    "人类反馈强化学习先训练奖励模型,再用它优化策略。",
    "分词器把文本切成词元,模型只看到它们的编号。",
    "低秩适配只训练两个很小的矩阵。",
]
_OTHER = [
    "Größe, Übung, naïve café — déjà vu.", "Привет, как дела?", "こんにちは世界、テストです。",
    "안녕하세요 세계", "مرحبا بالعالم", "😀 🚀🔥 👍🏽 🇨🇳 👨‍👩‍👧", "α β γ ∑ ∫ ≤ ≥ ∞",
]
_CODE = [
    "def train(model, data):\n    for step, batch in enumerate(data):\n        loss = model(batch)\n        loss.backward()\n",
    "if (x > 0) {\n\treturn x * 2;\n} else {\n\treturn -x;\n}\n",
    "for i in range(10):\n        print(f\"{i:03d}\")  # padded\n",
    "SELECT id, name FROM users WHERE age >= 18;\r\n",
    "    \n\n   x = [1, 2, 3]\r\n\r\n\t\tindent\t\ttabs\n",
]


_SYLLABLES = ["ka", "to", "re", "mi", "sun", "tra", "ing", "ble", "er", "on", "ex", "pro", "li", "va", "de", "st",
              "qu", "or", "an", "ti", "ful", "ness", "ly", "ion", "com", "pre", "ze", "ho", "ma", "gu"]
# A slice of the CJK block in which most common Chinese characters lie.
_CJK_START, _CJK_SIZE = 0x4E00, 3000


def _number(rng: random.Random) -> str:
    return rng.choice([str(rng.randint(0, 10**rng.randint(1, 12))), f"{rng.random() * 1000:.3f}",
                       f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"])


def _zipf_index(rng: random.Random, n: int) -> int:
    # Word frequencies in real text fall off roughly as 1/rank (Zipf's law): a few words are
    # everywhere, most are rare. That mix is what makes a BPE cache hit or miss.
    return min(int(10 * rng.paretovariate(1.0)) - 10, n - 1)


def _pseudo_sentence(rng: random.Random, lexicon: list[str]) -> str:
    words = [lexicon[_zipf_index(rng, len(lexicon))] for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.3:
        words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", ",", "!", "?", ";", ""])


def _pseudo_chinese(rng: random.Random, hanzi: list[str]) -> str:
    chars = [hanzi[_zipf_index(rng, len(hanzi))] for _ in range(rng.randint(5, 30))]
    return "".join(chars) + rng.choice(["。", ",", "!", "?", ""])


def mixed_text(n_chars: int, seed: int = 0) -> str:
    """About ``n_chars`` characters of mixed text, the same for the same seed."""
    rng = random.Random(seed)
    lexicon_rng = random.Random(12345)  # the same made-up vocabulary for every seed
    lexicon = ["".join(lexicon_rng.choices(_SYLLABLES, k=lexicon_rng.randint(1, 4))) for _ in range(50_000)]
    hanzi = [chr(_CJK_START + i) for i in range(_CJK_SIZE)]
    lexicon_rng.shuffle(hanzi)  # so the frequent ones are not simply the first code points
    out, size = [], 0
    while size < n_chars:
        kind = rng.random()
        if kind < 0.2:
            piece = rng.choice(_ENGLISH)
        elif kind < 0.35:
            piece = rng.choice(_CHINESE)
        elif kind < 0.5:
            piece = _pseudo_sentence(rng, lexicon)
        elif kind < 0.6:
            piece = _pseudo_chinese(rng, hanzi)
        elif kind < 0.7:
            piece = rng.choice(_OTHER)
        elif kind < 0.85:
            piece = rng.choice(_CODE)
        else:
            piece = f"{_number(rng)} items"
        # Recombine words so the text is not only a handful of repeated sentences.
        if rng.random() < 0.5 and " " in piece:
            words = piece.split(" ")
            rng.shuffle(words)
            piece = " ".join(words)
        sep = rng.choice([" ", " ", " ", "\n", "\n\n", "  ", "\t", "\r\n", "   "])
        out.append(piece + sep)
        size += len(piece) + len(sep)
    return "".join(out)
