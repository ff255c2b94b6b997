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


def _number(rng: random.Random) -> str:
    return rng.choice([str(rng.randint(0, 10**rng.randint(1, 12))), f"{rng.random() * 1000:.3f}",
                       f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"])


def mixed_text(n_chars: int, seed: int = 0) -> str:
    """About ``n_chars`` characters of mixed text, the same for the same seed."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        kind = rng.random()
        if kind < 0.35:
            piece = rng.choice(_ENGLISH)
        elif kind < 0.6:
            piece = rng.choice(_CHINESE)
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
