"""The tiny world's general-ability suite: four-choice questions on what pretraining taught.

Fine-tuning for one skill can cost others: the "alignment tax" (对齐税; Ouyang et al. 2022,
InstructGPT, arXiv:2203.02155, section 4.2). Real models measure it on MMLU-like suites; the tiny
world has its own, in the same layout (a folder of per-subject CSVs, minitune/eval/benchmark.py),
so `minitune eval` reads it like MMLU:

    subjects  sums (30), reversals (40), capitals (6), colours (5), sounds (7)
    questions "Question: What does 3+4 make?\\nAnswer:" with four options, one right

The items are the ones the SFT data never trains on (``tasks.world_split``'s held-out sums, word
lists and facts; animal sounds, a task SFT never asks about), asked in the corpus's quiz phrasing,
which no SFT example uses. So the suite measures what pretraining left in the model, not what a
later stage taught. The wrong options are near misses: sums off by one to three, other orders of
the same words, other values of the same table. The dev split (five questions per subject, from the
SFT-side items; for sounds, five of the twelve animals, kept out of the test split) holds few-shot
examples.

`general_ability(model, tok)` scores the suite in memory with the log-likelihood scorer (loglik.py):
the corpus wrote quizzes exactly as "Question: ...\\nAnswer: ...", so the option the model finds most
likely is its answer. Chance is 25%.
"""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import torch

from ..atomic import atomic_dir
from ..data import encode_segments, get_template
from ..eval.batching import target_logprobs
from ..eval.benchmark import LETTERS, Question, Subject
from ..eval.letter import score_letters
from ..eval.loglik import score_choices
from .corpus import CAPITALS, COLOURS, SEED, SOUNDS
from .tasks import world_split

# subject -> (display name, category); written as mapping.json, as LLaMA-Factory's benchmarks have
SUBJECTS = {"sums": ("sums", "Arithmetic"), "reversals": ("word reversal", "Word order"),
            "capitals": ("capital cities", "Knowledge"), "colours": ("colours of things", "Knowledge"),
            "sounds": ("animal sounds", "Knowledge")}
N_DEV = 5


def _wrong_sums(total: int, rng: random.Random) -> list[str]:
    near = [total + d for d in (-2, -1, 1, 2, 3, -3) if total + d >= 0]
    return [str(v) for v in rng.sample(near, 3)]


def _wrong_orders(words: tuple, rng: random.Random) -> list[str]:
    others = [" ".join(p) for p in itertools.permutations(words) if p != tuple(reversed(words))]
    return rng.sample(others, 3)


def _wrong_values(answer: str, table: dict, rng: random.Random) -> list[str]:
    return rng.sample(sorted(set(table.values()) - {answer}), 3)


def _question(text: str, answer: str, wrong: list[str], rng: random.Random, where: str) -> Question:
    options = [answer] + wrong
    rng.shuffle(options)
    return Question(text, options, LETTERS[options.index(answer)], where)


def _items(subject: str, held_out: bool, seed: int) -> list[tuple]:
    split = world_split(seed)
    part = 1 if held_out else 0
    if subject == "sums":
        return split["arithmetic"][part]
    if subject == "reversals":
        return split["reversal"][part]
    if subject == "sounds":  # SFT never asks about sounds: the table splits into dev examples and test
        items = sorted(SOUNDS.items())
        return items[N_DEV:] if held_out else items[:N_DEV]
    return split["capital" if subject == "capitals" else "colour"][part]


def _ask(subject: str, item, rng: random.Random, where: str) -> Question:
    if subject == "sums":
        a, b = item
        return _question(f"What does {a}+{b} make?", str(a + b), _wrong_sums(a + b, rng), rng, where)
    if subject == "reversals":
        return _question(f"Reverse {' '.join(item)}.", " ".join(reversed(item)), _wrong_orders(item, rng), rng, where)
    table, frame = {"capitals": (CAPITALS, "What is the capital city of {}?"),
                    "colours": (COLOURS, "What colour does the {} have?"),
                    "sounds": (SOUNDS, "What noise does a {} make?")}[subject]
    k, v = item
    return _question(frame.format(k), v, _wrong_values(v, table, rng), rng, where)


def suite(seed: int = SEED) -> list[Subject]:
    """The suite's subjects, each with its test questions and N_DEV dev questions; the same seed, the same suite."""
    rng = random.Random(seed + 23)
    out = []
    for name, (title, category) in SUBJECTS.items():
        test = [_ask(name, item, rng, f"{name}_test.csv:{i + 1}") for i, item in enumerate(_items(name, True, seed))]
        dev_items = _items(name, False, seed)[:N_DEV]
        dev = [_ask(name, item, rng, f"{name}_dev.csv:{i + 1}") for i, item in enumerate(dev_items)]
        out.append(Subject(name, title, category, test, dev))
    return out


def write_general_suite(folder, seed: int = SEED) -> Path:
    """Write the suite as FOLDER/{dev,test}/SUBJECT_SPLIT.csv (MMLU's headerless rows) plus mapping.json.

    Then `minitune eval` with task_dir FOLDER's parent and task FOLDER's name + "_test" reads it.
    """
    def rows(questions):
        lines = []
        for q in questions:
            cells = [q.question, *q.choices, q.answer]
            lines.append(",".join('"' + c.replace('"', '""') + '"' for c in cells))
        return "\n".join(lines) + "\n"

    with atomic_dir(folder) as tmp:
        for split in ("dev", "test"):
            (tmp / split).mkdir()
        for s in suite(seed):
            (tmp / "test" / f"{s.name}_test.csv").write_text(rows(s.questions), encoding="utf-8")
            (tmp / "dev" / f"{s.name}_dev.csv").write_text(rows(s.dev), encoding="utf-8")
        mapping = {name: {"name": title, "category": cat} for name, (title, cat) in SUBJECTS.items()}
        (tmp / "mapping.json").write_text(json.dumps(mapping, indent=2) + "\n", encoding="utf-8")
    return Path(folder)


def chat_choices(model, tok, subject: Subject, template: str = "chatml", batch_size: int = 32) -> list[bool]:
    """Each option scored as the reply to the question in a chat template: a chat model's own format.

    ll(c) = log p(c | user turn + assistant header), as loglik.py but without the quiz frame; correct
    when the right option has the highest ll.
    """
    chat = get_template(template)
    rows, starts = [], []
    for q in subject.questions:
        prompt = encode_segments(tok, chat.segments([{"role": "user", "content": q.question}],
                                                    add_generation_prompt=True))[0]
        for c in q.choices:
            rows.append(prompt + tok.encode(c))
            starts.append(len(prompt))
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    lls = [lp.sum().item() for i in range(0, len(rows), batch_size)
           for lp in target_logprobs(model, rows[i:i + batch_size], starts[i:i + batch_size], pad)]
    per_question = torch.tensor(lls).view(len(subject.questions), len(LETTERS))  # [N, 4]
    return [int(i) == q.label for i, q in zip(per_question.argmax(-1), subject.questions)]


def general_ability(model, tok, scorer: str = "loglik", n_shot: int = 0, batch_size: int = 32,
                    seed: int = SEED, per_subject: bool = False, template: str = "chatml",
                    per_subject_limit: int | None = None):
    """The suite's accuracy (0..1) for a loaded model: the number the lessons print before and after a stage.

    scorer "loglik" (default): the most likely option text after the quiz frame pretraining wrote
    (lm-evaluation-harness's way); "chat": the most likely option as the reply in `template` (after
    SFT, the model's own format: loglik falling while chat holds means the format moved, not the
    knowledge); "letter": LLaMA-Factory's answer letter (a model this small never learned lettered
    options, so expect chance there). per_subject=True returns (accuracy, {subject: accuracy}).
    per_subject_limit=k asks only each subject's first k questions (the lessons' --fast mode).
    """
    was_training = model.training
    model.eval()
    subjects, hits, total, by_subject = suite(seed), 0, 0, {}
    for s in subjects:
        if per_subject_limit is not None:
            s.questions = s.questions[:per_subject_limit]
        if scorer == "loglik":
            correct = score_choices(model, tok, s, n_shot, batch_size)["correct"]
        elif scorer == "chat":
            correct = chat_choices(model, tok, s, template, batch_size)
        else:
            correct = score_letters(model, tok, s, n_shot, "fewshot", "en", batch_size, random.Random(seed))["correct"]
        hits, total = hits + sum(correct), total + len(correct)
        by_subject[s.name] = sum(correct) / len(correct)
    model.train(was_training)
    return (hits / total, by_subject) if per_subject else hits / total
