"""lm-evaluation-harness's multiple-choice scorer: which answer text does the model find most likely?

Each option is scored as a continuation of the question (the cloze form; Brown et al. 2020, GPT-3,
arXiv:2005.14165, section 2.4):

    ll(c) = sum_{t in c} log p(c_t | context, c_<t)

    acc       : argmax_c ll(c)                 == answer
    acc_norm  : argmax_c ll(c) / chars(c)      == answer   (lm-eval 0.4's acc_norm: length in characters)
    acc_bytes : argmax_c ll(c) / bytes(c)      == answer   (UTF-8 bytes, lm-eval's acc_bytes)

The normalised forms stop long options from losing just for having more tokens to pay for.
The prompt is lm-eval's MMLU "continuation" task: a line naming the subject, the first k dev
questions with their answers (its `first_n` few-shot sampler), then the question:

    The following are questions (with answers) about anatomy.

    Question: What is ...?
    Answer: the right option's text

    Question: Which ...?
    Answer:                    <- continuation " " + option text

As lm-eval does, whitespace at the end of the context moves to the front of the continuation, and
the continuation's tokens are those of encode(context + continuation) after encode(context)'s.
"""

from __future__ import annotations

import torch

from .batching import target_logprobs
from .benchmark import BenchmarkError, Question, Subject

DESCRIPTION = "The following are questions (with answers) about {subject}.\n\n"


def doc_text(q: Question) -> str:
    return f"Question: {q.question.strip()}\nAnswer:"


def context(q: Question, shots: list[Question], subject_title: str) -> str:
    examples = "".join(f"{doc_text(s)} {s.choices[s.label]}\n\n" for s in shots)
    return DESCRIPTION.format(subject=subject_title) + examples + doc_text(q)


def encode_pair(tok, ctx: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the continuation is what encoding both adds after the context."""
    n_spaces = len(ctx) - len(ctx.rstrip())
    if n_spaces:  # "Answer: " + "Paris" -> "Answer:" + " Paris": BPE spells words with their leading space
        ctx, continuation = ctx[:-n_spaces], ctx[-n_spaces:] + continuation
    whole, ctx_ids = tok.encode(ctx + continuation), tok.encode(ctx)
    return ctx_ids, whole[len(ctx_ids):]


def choose(lls: torch.Tensor, choices: list[str]) -> tuple[int, int, int]:
    """(argmax ll, argmax ll / characters, argmax ll / UTF-8 bytes) for one question's [4] log-likelihoods."""
    chars = torch.tensor([float(len(c)) for c in choices])
    nbytes = torch.tensor([float(len(c.encode("utf-8"))) for c in choices])
    return int(lls.argmax()), int((lls / chars).argmax()), int((lls / nbytes).argmax())


def score_choices(model, tok, subject: Subject, n_shot: int = 0, batch_size: int = 8, progress=None) -> dict:
    """One subject: {"ll": [[4 floats], ...], "pred", "correct", "correct_norm", "correct_bytes"}."""
    shots = subject.dev[:n_shot]
    room = model.config.max_position_embeddings - getattr(model, "num_virtual_tokens", 0)
    requests = []  # (context ids + continuation ids, where the continuation starts)
    for q in subject.questions:
        ctx = context(q, shots, subject.title)
        for choice in q.choices:
            ctx_ids, cont_ids = encode_pair(tok, ctx, " " + choice)
            if not ctx_ids or not cont_ids:
                raise BenchmarkError(f"{q.where}: an option that encodes to no tokens ({choice!r})")
            if len(ctx_ids) + len(cont_ids) > room:
                raise BenchmarkError(f"{q.where}: with {n_shot} examples the prompt is {len(ctx_ids) + len(cont_ids)} "
                                     f"tokens, longer than the model's context of {room} (lower n_shot)")
            requests.append((ctx_ids + cont_ids, len(ctx_ids)))
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    lls, n_choices = [], len(subject.questions[0].choices)
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        lls += [lp.sum().item() for lp in target_logprobs(model, [r for r, _ in batch], [s for _, s in batch], pad)]
        if progress is not None:  # in whole questions
            progress.update(len(lls) // n_choices - (len(lls) - len(batch)) // n_choices)
    lls = torch.tensor(lls, dtype=torch.float64).view(len(subject.questions), -1)  # [N, 4]
    picks = [choose(row, q.choices) for row, q in zip(lls, subject.questions)]
    return {"ll": lls.tolist(), "pred": [p[0] for p in picks],
            "correct": [p[0] == q.label for p, q in zip(picks, subject.questions)],
            "correct_norm": [p[1] == q.label for p, q in zip(picks, subject.questions)],
            "correct_bytes": [p[2] == q.label for p, q in zip(picks, subject.questions)]}
