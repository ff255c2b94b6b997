"""Evaluation: multiple-choice benchmarks (MMLU, CMMLU, C-Eval layouts) and perplexity.

    benchmark.py   reading the per-subject CSV folders, with file:line errors
    batching.py    left-padded batches, the LM head only at the positions scored
    letter.py      LLaMA-Factory's scorer: k-shot prompt, argmax over the letters' next-token logits
    loglik.py      lm-evaluation-harness's scorer: log-likelihood of each option (acc, acc_norm)
    perplexity.py  a text file's perplexity with a strided window
    report.py      per-subject / per-category tables and the files in save_dir
    run.py         `minitune eval CONFIG.yaml`
"""

from .benchmark import LETTERS, BenchmarkError, Question, Subject, load_benchmark
from .letter import score_letters
from .loglik import score_choices
from .perplexity import file_perplexity, perplexity
from .report import summarize, table
from .run import EVAL_KEYS, EVAL_NOTED, eval_args, evaluate_subjects, run_eval

__all__ = ["EVAL_KEYS", "EVAL_NOTED", "LETTERS", "BenchmarkError", "Question", "Subject", "eval_args",
           "evaluate_subjects", "file_perplexity", "load_benchmark", "perplexity", "run_eval", "score_choices",
           "score_letters", "summarize", "table"]
