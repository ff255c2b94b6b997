"""`minitune eval CONFIG.yaml`: LLaMA-Factory's `llamafactory-cli eval`, plus a log-likelihood scorer and perplexity.

    task: mmlu_test          # NAME_SPLIT: a folder TASK_DIR/NAME of per-subject CSVs (benchmark.py)
    task_dir: evaluation     # as LLaMA-Factory's repository lays it out
    n_shot: 5
    lang: en                 # en | zh: the question layout of the letter scorer
    template: fewshot        # or a chat template (chatml, qwen, llama3, ...)
    batch_size: 4
    save_dir: saves/eval     # a new folder: results.json, results.log, scores.json
    model_name_or_path: weights/tiny
    adapter_name_or_path: saves/lora   # optional

`scorer: letter` (default) scores as LLaMA-Factory does (letter.py); `scorer: loglik` as
lm-evaluation-harness's multiple-choice tasks do (loglik.py). `task: ppl` with `task_dir` naming a
text file reports perplexity instead (perplexity.py; window `cutoff_len`, stride `ppl_stride`).
"""

from __future__ import annotations

import argparse
import random
import sys

from tqdm import tqdm

from .. import chat
from ..seed import seed_everything
from .benchmark import BenchmarkError, load_benchmark, split_task
from .letter import EVAL_TEMPLATES, eval_chat_template, score_letters
from .loglik import score_choices
from .perplexity import file_perplexity
from .report import check_save_dir, predicted_letters, save, summarize, table

SCORERS = {"letter": ("acc",), "loglik": ("acc", "acc_norm", "acc_bytes")}

# LLaMA-Factory eval config keys -> `minitune eval` flags (dest names); cli.settings_from_file reads them
EVAL_KEYS = {"model_name_or_path": "model", "adapter_name_or_path": "adapter", "template": "template",
             "task": "task", "task_dir": "task_dir", "split": "split", "lang": "lang", "n_shot": "n_shot",
             "batch_size": "batch_size", "save_dir": "save_dir", "seed": "seed", "scorer": "scorer",
             "cutoff_len": "cutoff_len", "ppl_stride": "ppl_stride"}
EVAL_NOTED = {"finetuning_type": "the adapter folder says which method it holds",
              "trust_remote_code": "minitune runs no code from a model folder",
              "download_mode": "minitune reads local folders only", "infer_dtype": "use --dtype"}


def eval_args(p: argparse.ArgumentParser):
    """The `minitune eval` flags; a config file's keys (EVAL_KEYS) become their defaults."""
    p.add_argument("config", nargs="?", help="an eval config (.yaml/.json, as llamafactory-cli eval takes); flags win")
    p.add_argument("--model", help="checkpoint folder (model_name_or_path)")
    p.add_argument("--adapter", help="adapter folder (adapter_name_or_path)")
    p.add_argument("--task", help="mmlu_test, cmmlu_test, ceval_validation, ... (NAME_SPLIT), or ppl")
    p.add_argument("--task_dir", default="evaluation", help="folder holding NAME/ (default evaluation); "
                                                            "for task ppl, the text file")
    p.add_argument("--split", help="the split, when the task name has none (test, validation, dev)")
    p.add_argument("--lang", default="en", help=f"question layout: {', '.join(EVAL_TEMPLATES)} (default en)")
    p.add_argument("--n_shot", type=int, default=5, help="worked examples from the dev split (default 5)")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--save_dir", help="a new folder for results.json, results.log, scores.json")
    p.add_argument("--template", default="fewshot", help="chat template for the letter scorer (default fewshot)")
    p.add_argument("--seed", type=int, default=42, help="draws the few-shot examples (default 42)")
    p.add_argument("--scorer", default="letter", help="letter (LLaMA-Factory) | loglik (lm-evaluation-harness)")
    p.add_argument("--cutoff_len", type=int, help="task ppl: window length (default: the model's context)")
    p.add_argument("--ppl_stride", type=int, help="task ppl: window start every N tokens (default window // 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's) | float32 | bfloat16 | float16")


def check_args(args):
    """Everything that can be checked before the model loads."""
    if not args.task:
        raise BenchmarkError("eval: task is needed (mmlu_test, cmmlu_test, ceval_validation, ..., or ppl)")
    if args.scorer not in SCORERS:
        raise BenchmarkError(f"scorer {args.scorer!r}: expected one of {', '.join(SCORERS)}")
    if args.lang not in EVAL_TEMPLATES:
        raise BenchmarkError(f"lang {args.lang!r}: expected one of {', '.join(EVAL_TEMPLATES)}")
    for key in ("n_shot", "batch_size"):
        value = getattr(args, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "batch_size" else 0):
            raise BenchmarkError(f"{key} {value!r}: expected a whole number >= {1 if key == 'batch_size' else 0}")
    eval_chat_template(args.template)
    check_save_dir(args.save_dir)


def evaluate_subjects(model, tok, subjects, scorer="letter", n_shot=5, template="fewshot", lang="en",
                      batch_size=4, seed=42, progress: bool = True) -> dict:
    """{subject name: the scorer's per-question lists} for a loaded model; a progress bar over questions."""
    rng = random.Random(seed)
    bar = tqdm(total=sum(len(s.questions) for s in subjects), desc=f"eval ({scorer})", unit="q",
               disable=not progress, file=sys.stderr)
    results = {}
    for s in subjects:
        bar.set_postfix_str(s.name)
        if scorer == "letter":
            results[s.name] = score_letters(model, tok, s, n_shot, template, lang, batch_size, rng, bar)
        else:
            results[s.name] = score_choices(model, tok, s, n_shot, batch_size, bar)
    bar.close()
    return results


def window_bar(n: int):
    return tqdm(total=n, desc="perplexity", unit="window", file=sys.stderr)


def run_eval(args) -> dict:
    """The whole command: check, load, score, print the table, save; returns scores.json's content."""
    check_args(args)
    is_ppl = args.task == "ppl"
    if not is_ppl:  # read (and check) the data before the model: a bad row fails fast
        subjects = load_benchmark(args.task_dir, args.task, args.split, args.n_shot)
    model, tok, _ = chat.load_for_inference(args)
    seed_everything(args.seed)
    settings = {k: getattr(args, k) for k in ("model", "adapter", "task", "task_dir", "split", "lang", "n_shot",
                                              "template", "scorer", "seed")}
    if is_ppl:
        scores = file_perplexity(model, tok, args.task_dir, args.cutoff_len, args.ppl_stride, args.batch_size,
                                 window_bar)
        text = (f"perplexity {scores['ppl']:.4f} (mean NLL {scores['nll']:.4f} nats) over {scores['tokens']} tokens "
                f"of {scores['file']}; {scores['windows']} windows of {scores['window']}, stride {scores['stride']}")
        print(text)
        scores = {**scores, "settings": settings}
        if args.save_dir:
            save(args.save_dir, scores, text)
        return scores
    settings["split"] = split_task(args.task, args.split)[1]
    results = evaluate_subjects(model, tok, subjects, args.scorer, args.n_shot, args.template, args.lang,
                                args.batch_size, args.seed)
    metrics = SCORERS[args.scorer]
    summary = summarize(subjects, results, metrics)
    text = table(summary, metrics)
    print(text)
    scores = {**summary, "settings": settings,
              "per_question": {s: {k: v for k, v in r.items() if k in ("letter_logits", "ll")}
                               for s, r in results.items()}}
    if args.save_dir:
        save(args.save_dir, scores, text, predicted_letters(subjects, results))
        print(f"saved {args.save_dir}/scores.json, results.json, results.log")
    return scores
