"""Accuracy per subject, per category and overall; the printed table and the files in save_dir.

Categories average over questions, not subjects (a subject with 500 questions weighs 500 times one
with 1), as LLaMA-Factory's "Average" and its STEM / Social Sciences / Humanities / Other rows do.

save_dir gets, written at once (minitune/atomic.py: all three files or none):
    results.json  LLaMA-Factory's file: {subject: {"0": "B", "1": "D", ...}}, the predicted letters
    results.log   the table as printed
    scores.json   {"subjects": {name: {metric: value, "n": .., "category": ..}}, "categories": {...},
                   "average": {...}, "settings": {...}}; perplexity: {"ppl", "nll", "tokens", ...}
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_dir
from .benchmark import LETTERS, BenchmarkError, Subject

AVERAGE = "Average"


def accuracy(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def summarize(subjects: list[Subject], results: dict[str, dict], metrics: tuple[str, ...]) -> dict:
    """results: {subject name: {"correct": [bool], ... one list per metric}} -> subject/category/average rows."""
    names = {"acc": "correct", "acc_norm": "correct_norm", "acc_bytes": "correct_bytes"}
    pooled: dict[str, dict[str, list[bool]]] = {}
    rows = {}
    for s in subjects:
        r = results[s.name]
        rows[s.name] = {"category": s.category, "n": len(r["correct"]),
                        **{m: accuracy(r[names[m]]) for m in metrics}}
        for group in ([s.category] if s.category else []) + [AVERAGE]:
            for m in metrics:
                pooled.setdefault(group, {}).setdefault(m, []).extend(r[names[m]])
    groups = {g: {"n": len(v[metrics[0]]), **{m: accuracy(v[m]) for m in metrics}} for g, v in pooled.items()}
    average = groups.pop(AVERAGE)
    return {"subjects": rows, "categories": groups, "average": average}


def table(summary: dict, metrics: tuple[str, ...]) -> str:
    """Subjects, then categories, then the average: one line each, accuracies in percent."""
    width = max([len(AVERAGE), *map(len, summary["subjects"]), *map(len, summary["categories"])])
    head = f"{'':>{width}}  {'n':>5}  " + "  ".join(f"{m:>9}" for m in metrics)

    def line(name, row):
        return f"{name:>{width}}  {row['n']:>5}  " + "  ".join(f"{100 * row[m]:>9.2f}" for m in metrics)

    lines = [head] + [line(k, v) for k, v in summary["subjects"].items()]
    if summary["categories"]:
        lines += [""] + [line(k, v) for k, v in summary["categories"].items()]
    return "\n".join(lines + [line(AVERAGE, summary["average"])])


def check_save_dir(save_dir) -> None:
    """Refuse a save_dir that exists, before any work (LLaMA-Factory refuses it too)."""
    if save_dir and Path(save_dir).exists():
        raise BenchmarkError(f"save_dir {save_dir}: already exists (give a new folder; nothing is overwritten)")


def predicted_letters(subjects: list[Subject], results: dict[str, dict]) -> dict:
    """LLaMA-Factory's results.json: {subject: {"0": letter, ...}} (loglik predictions as letters too)."""
    out = {}
    for s in subjects:
        pred = results[s.name]["pred"]
        out[s.name] = {str(i): p if isinstance(p, str) else LETTERS[p] for i, p in enumerate(pred)}
    return out


def save(save_dir, scores: dict, log_text: str, letters: dict | None = None) -> Path:
    with atomic_dir(save_dir) as tmp:
        (tmp / "scores.json").write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "results.log").write_text(log_text + "\n", encoding="utf-8")
        if letters is not None:
            (tmp / "results.json").write_text(json.dumps(letters, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    return Path(save_dir)
