"""LLaMA-Factory's multiple-choice scorer: k worked examples, then the question; which letter comes next?

The prompt is a conversation. Each of the k examples (drawn from the subject's dev split) is a user
turn holding the question, its options and "Answer:", and an assistant turn holding the letter; the
question to score is the last user turn. The first turn starts with one line naming the subject:

    The following are multiple choice questions (with answers) about abstract algebra.

    Find the degree of ...
    A. 0
    B. 4
    C. 2
    D. 6
    Answer:                         <- the model's next token decides

rendered with a chat template (LLaMA-Factory's `fewshot`, below, is plain text: each reply is
followed by a blank line, as in Hendrycks et al.'s MMLU prompts). The prediction is

    argmax_{c in A,B,C,D}  logits_T[id(c)]

over the next-token logits at the prompt's last position T, where id(c) is the last token of
encoding the bare letter (softmax first, as LLaMA-Factory does, changes nothing). Accuracy is the
fraction of predictions equal to the answer. The k examples are a fresh random draw for every
question, as LLaMA-Factory shuffles the dev split each time; here the draw is random.Random(seed),
so the examples (not the method) differ from LLaMA-Factory's own run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..data import encode_segments
from ..data.templates import TEMPLATES, Template, TemplateError
from .batching import last_logits
from .benchmark import LETTERS, BenchmarkError, Question, Subject


@dataclass(frozen=True)
class EvalTemplate:
    """How one question becomes text (LLaMA-Factory's `en` and `zh` evaluation templates)."""
    system: str  # takes {subject}
    choice: str  # takes {choice} (the letter) and {content}
    answer: str


EVAL_TEMPLATES = {
    "en": EvalTemplate("The following are multiple choice questions (with answers) about {subject}.\n\n",
                       "\n{choice}. {content}", "\nAnswer:"),
    "zh": EvalTemplate("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
                       "\n{choice}. {content}", "\n答案："),
}

# LLaMA-Factory's `fewshot` chat template: user turns as they are, each reply followed by a blank line
FEWSHOT = Template(name="fewshot", user="{content}", assistant="{content}\n\n")


def eval_chat_template(name: str | None) -> Template:
    """`fewshot` (the default, as in LLaMA-Factory's eval examples) or any of minitune's chat templates."""
    if name in (None, "fewshot"):
        return FEWSHOT
    if name not in TEMPLATES:
        raise TemplateError(f"unknown chat template {name!r} (known: fewshot, {', '.join(TEMPLATES)})")
    return TEMPLATES[name]


def question_text(q: Question, lang: str) -> str:
    t = EVAL_TEMPLATES[lang]
    return q.question + "".join(t.choice.format(choice=c, content=text) for c, text in zip(LETTERS, q.choices)) + t.answer


def messages(q: Question, shots: list[Question], subject_title: str, lang: str = "en") -> list[dict]:
    """The conversation up to the question to score (its answer is what the model must give)."""
    out = []
    for shot in shots:
        out += [{"role": "user", "content": question_text(shot, lang)}, {"role": "assistant", "content": shot.answer}]
    out.append({"role": "user", "content": question_text(q, lang)})
    out[0] = {"role": "user", "content": EVAL_TEMPLATES[lang].system.format(subject=subject_title) + out[0]["content"]}
    return out


def letter_ids(tok) -> list[int]:
    """The token each answer letter is read from: the last token of encoding the bare letter."""
    return [tok.encode(c)[-1] for c in LETTERS]


def prompt_ids(tok, template: Template, q: Question, shots: list[Question], subject: Subject, lang: str) -> list[int]:
    segments = template.segments(messages(q, shots, subject.title, lang), add_generation_prompt=True)
    return encode_segments(tok, segments)[0]


def score_letters(model, tok, subject: Subject, n_shot: int = 5, template: str | None = "fewshot", lang: str = "en",
                  batch_size: int = 4, rng: random.Random | None = None, progress=None) -> dict:
    """One subject: {"pred": ["B", ...], "correct": [bool, ...], "letter_logits": [[4 floats], ...]}."""
    if lang not in EVAL_TEMPLATES:
        raise BenchmarkError(f"lang {lang!r}: expected one of {', '.join(EVAL_TEMPLATES)}")
    rng = rng or random.Random(0)
    chat = eval_chat_template(template)
    context = model.config.max_position_embeddings - getattr(model, "num_virtual_tokens", 0)
    rows = []
    for q in subject.questions:
        shots = rng.sample(subject.dev, n_shot) if n_shot else []
        rows.append(prompt_ids(tok, chat, q, shots, subject, lang))
        if len(rows[-1]) > context:
            raise BenchmarkError(f"{q.where}: with {n_shot} examples the prompt is {len(rows[-1])} tokens, longer than "
                                 f"the model's context of {context} (lower n_shot)")
    ids = torch.tensor(letter_ids(tok))
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    logits = []
    for i in range(0, len(rows), batch_size):
        logits.append(last_logits(model, rows[i:i + batch_size], pad)[:, ids.to(model.lm_head.weight.device)].cpu())
        if progress is not None:
            progress.update(len(rows[i:i + batch_size]))
    logits = torch.cat(logits)  # [N, 4]
    pred = [LETTERS[j] for j in logits.argmax(-1).tolist()]
    return {"pred": pred, "correct": [p == q.answer for p, q in zip(pred, subject.questions)],
            "letter_logits": logits.tolist()}
