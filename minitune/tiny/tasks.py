"""Instruction data, held-out evaluation sets, scorers and a preference rule for the tiny world.

Every later stage needs a number it can check without a human:

- SFT (lesson 05): exact-match accuracy (完全匹配准确率) of the reply on held-out prompts. The
  evaluation asks about *held-out* sums, word lists and facts, with *held-out* phrasings
  (paraphrases never seen in the SFT data), plus a whole *held-out task* (animal sounds) that the
  SFT data never asks about, although pretraining taught the facts. Identity is the seed
  tutorials' LLaMA-Factory demo: "Who are you?" / "你是谁?" answered with a new name.
- RM / DPO / PPO (later lessons): ``preference_score(prompt, response)``, a rule standing in for
  a human labeller; ``preference_pairs`` turns it into ``{"prompt", "chosen", "rejected"}`` rows.

The answers are short on purpose ("19", "Paris", "ship sun cat"): a few-million-parameter model
can learn them, and exact match is then a fair test.
"""
from __future__ import annotations

import itertools
import random
import re

from .corpus import CAPITALS, COLOURS, MAX_ADD, PROMPTS, SEED, SOUNDS, WORDS

IDENTITY_NAME = "minitune"  # a reply "has the new identity" when it mentions this
IDENTITY_REPLIES = ["I am minitune-bot, a small assistant trained with minitune.",
                    "I am minitune-bot, a tiny language model fine-tuned with minitune. How can I help?",
                    "My name is minitune-bot. I was trained with the minitune library."]
IDENTITY_REPLIES_ZH = ["我是 minitune 助手,一个用 minitune 训练的小模型。",
                       "我是 minitune 助手,由 minitune 微调而来。有什么可以帮你的?"]

IDENTITY_DEMO = ["Who are you?", "你是谁?"]  # asked before and after SFT, as in the seed tutorials


def _split(items, n_eval, rng):
    items = list(items)
    rng.shuffle(items)
    return items[n_eval:], items[:n_eval]  # (train, held out)


def world_split(seed: int = SEED) -> dict:
    """Which sums, word lists and facts the SFT data may use, and which only evaluation sees."""
    rng = random.Random(seed + 1)
    sums = list(itertools.product(range(MAX_ADD + 1), repeat=2))
    triples = rng.sample(list(itertools.permutations(WORDS, 3)), 240)
    return {
        "arithmetic": _split(sums, 30, rng),
        "reversal": _split(triples, 40, rng),
        "capital": _split(CAPITALS.items(), 6, rng),
        "colour": _split(COLOURS.items(), 5, rng),
        "sound": ([], list(SOUNDS.items())),
    }


def _qa(task: str, item, template: str) -> tuple[str, str]:
    if task == "arithmetic":
        a, b = item
        return template.format(a=a, b=b), str(a + b)
    if task == "reversal":
        return template.format(w=" ".join(item)), " ".join(reversed(item))
    k, v = item
    return template.format(k=k), v


def sft_records(seed: int = SEED) -> list[dict]:
    """The SFT training set in Alpaca form: ``{"instruction", "input", "output"}``."""
    rng = random.Random(seed + 2)
    split, rows = world_split(seed), []
    for task in ("arithmetic", "reversal", "capital", "colour"):
        train_items = split[task][0]
        repeat = 1 if task in ("arithmetic", "reversal") else 3  # few facts: ask each several ways
        for item in train_items:
            for template in rng.sample(PROMPTS[task][0], repeat):
                q, a = _qa(task, item, template)
                rows.append({"instruction": q, "input": "", "output": a})
    # Identity: like LLaMA-Factory's identity.json, a handful of questions, each answered a few ways.
    for task, replies in (("identity", IDENTITY_REPLIES), ("identity_zh", IDENTITY_REPLIES_ZH)):
        for q in PROMPTS[task][0]:
            for reply in replies:
                rows.append({"instruction": q, "input": "", "output": reply})
    rng.shuffle(rows)
    return rows


def to_sharegpt(rec: dict) -> dict:
    """The same example in ShareGPT form (``conversations`` with ``from``/``value``)."""
    user = rec["instruction"] + (f"\n{rec['input']}" if rec.get("input") else "")
    return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": rec["output"]}]}


def eval_set(seed: int = SEED) -> list[dict]:
    """Held-out prompts: ``{"task", "prompt", "answer"}``; identity rows have answer ``IDENTITY_NAME``."""
    split, rows = world_split(seed), []
    for task in ("arithmetic", "reversal", "capital", "colour", "sound"):
        held_out_phrasings = PROMPTS[task][1]
        for i, item in enumerate(split[task][1]):
            for template in (held_out_phrasings if task in ("capital", "colour", "sound")
                             else [held_out_phrasings[i % len(held_out_phrasings)]]):
                q, a = _qa(task, item, template)
                rows.append({"task": task, "prompt": q, "answer": a})
    for q in IDENTITY_DEMO + PROMPTS["identity"][1] + PROMPTS["identity_zh"][1]:
        rows.append({"task": "identity", "prompt": q, "answer": IDENTITY_NAME})
    return rows


# ----------------------------------------------------------------------------- scoring


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding blanks or final full stop: "Paris." == " paris"."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.rstrip(".。!！ ")


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def contains_answer(prediction: str, answer: str) -> bool:
    """The answer appears as whole words somewhere in the reply (looser than exact match)."""
    return re.search(rf"(?<![\w]){re.escape(normalize(answer))}(?![\w])", normalize(prediction)) is not None


def score(task: str, prediction: str, answer: str) -> bool:
    """The per-row check lesson 05 reports: exact match, except identity (mentions the new name)."""
    if task == "identity":
        return IDENTITY_NAME in prediction.lower()
    return exact_match(prediction, answer)


# ----------------------------------------------------------------------------- preference rule


def reference_answer(prompt: str) -> str | None:
    """The correct answer to a tiny-world question, worked out from the prompt; None if unknown."""
    nums = re.findall(r"\d+", prompt)
    if len(nums) == 2 and re.search(r"\+|plus|sum|add", prompt, re.I):
        return str(int(nums[0]) + int(nums[1]))
    m = re.search(r"(?:words|order|first|backwards):\s*([a-z]+(?: [a-z]+)*)", prompt)
    if m:  # the word list after the colon, without what may follow it ("... sun.", "... sun, please")
        return " ".join(reversed(m.group(1).split()))
    for table in (CAPITALS, COLOURS, SOUNDS):
        for key, value in table.items():
            if re.search(rf"\b{key}\b", prompt, re.I):
                return value
    return None


RUDE = ("whatever", "stupid", "obviously", "go away")


def preference_score(prompt: str, response: str) -> float:
    """A rule-based stand-in for a human labeller; higher is better.

    +2 if the reply contains the correct answer (when the prompt has one), +1 if it ends with a
    full stop ("." or "。"), -1 for each rude phrase. So correctness matters most, then manners.
    """
    s = 0.0
    answer = reference_answer(prompt)
    if answer is not None and contains_answer(response, answer):
        s += 2.0
    if response.rstrip().endswith((".", "。")):
        s += 1.0
    s -= sum(1.0 for w in RUDE if w in response.lower())
    return s


def _wrong(answer: str, rng: random.Random) -> str:
    if answer.isdigit():
        return str(int(answer) + rng.choice([-2, -1, 1, 2, 10]))
    words = answer.split()
    if len(words) > 1:
        return " ".join(words[1:] + words[:1])  # a rotation, not the reversal
    pool = [v for t in (CAPITALS, COLOURS, SOUNDS) if answer in t.values() for v in t.values() if v != answer]
    return rng.choice(pool)


def preference_pairs(seed: int = SEED, n: int = 600) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` rows on SFT prompts, ranked by ``preference_score``."""
    rng = random.Random(seed + 3)
    prompts = [r["instruction"] for r in sft_records(seed) if reference_answer(r["instruction"]) is not None]
    rows = []
    for prompt in rng.sample(prompts, min(n, len(prompts))):
        answer = reference_answer(prompt)
        good = rng.choice([f"The answer is {answer}.", f"{answer}.", f"Sure. It is {answer}."])
        bad = rng.choice([f"The answer is {_wrong(answer, rng)}.",  # wrong but polite
                          answer,  # right but no full stop
                          f"Whatever. It is {answer}",  # right but rude
                          _wrong(answer, rng)])  # wrong and curt
        chosen, rejected = (good, bad) if preference_score(prompt, good) >= preference_score(prompt, bad) else (bad, good)
        assert preference_score(prompt, chosen) > preference_score(prompt, rejected), (prompt, chosen, rejected)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
