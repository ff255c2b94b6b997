"""Ask a model the held-out questions through its chat template and score the replies.

Used by lesson 05 (before / after SFT) and the later lessons. A reply is what the model writes
after the assistant header, greedily, up to its end-of-turn token (``<|im_end|>`` for ChatML)
or ``max_new_tokens``; a model that never learned to stop therefore fails exact match even when
the answer is somewhere in its text, which is exactly what instruction tuning fixes.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..data import encode_segments, get_template
from ..generation import generate
from .tasks import contains_answer, score

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


def stop_ids(tok) -> list[int]:
    ids = {tok.token_to_id(t) for t in STOP_TOKENS} | {tok.eos_id}
    return sorted(i for i in ids if i is not None)


def prompt_ids(tok, question: str, template: str = "chatml") -> list[int]:
    """The tokens of one user turn plus the assistant header: where the reply starts."""
    segments = get_template(template).segments([{"role": "user", "content": question}], add_generation_prompt=True)
    return encode_segments(tok, segments)[0]


@torch.no_grad()
def ask(model, tok, questions: list[str], template: str = "chatml", max_new_tokens: int = 24,
        batch_size: int = 32) -> list[str]:
    """Greedy replies to single-turn questions, batched with left padding."""
    model.eval()
    device = next(model.parameters()).device
    stops = stop_ids(tok)
    pad = tok.pad_id if tok.pad_id is not None else stops[0]
    replies = []
    for i in range(0, len(questions), batch_size):
        rows = [prompt_ids(tok, q, template) for q in questions[i:i + batch_size]]
        n = max(map(len, rows))
        ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], device=device)
        out = generate(model, ids, max_new_tokens, eos_id=stops, attention_mask=mask)[:, n:].tolist()
        for new in out:
            cut = next((j for j, t in enumerate(new) if t in stops), len(new))  # up to the first stop token
            replies.append(tok.decode(new[:cut], skip_special_tokens=True).strip())
    return replies


def evaluate_tasks(model, tok, rows: list[dict], template: str = "chatml", max_new_tokens: int = 24) -> dict:
    """Per-task accuracy on ``{"task", "prompt", "answer"}`` rows (see ``tasks.eval_set``).

    Returns {"accuracy": {task: fraction}, "contains": {task: fraction}, "overall": fraction,
    "replies": [str]}; "contains" is the looser check (the answer appears anywhere in the reply).
    """
    replies = ask(model, tok, [r["prompt"] for r in rows], template, max_new_tokens)
    hits, loose, count = defaultdict(int), defaultdict(int), defaultdict(int)
    for r, reply in zip(rows, replies):
        count[r["task"]] += 1
        hits[r["task"]] += score(r["task"], reply, r["answer"])
        loose[r["task"]] += score(r["task"], reply, r["answer"]) or contains_answer(reply, r["answer"])
    return {"accuracy": {t: hits[t] / count[t] for t in count}, "contains": {t: loose[t] / count[t] for t in count},
            "overall": sum(hits.values()) / max(len(rows), 1), "n": dict(count), "replies": replies}
