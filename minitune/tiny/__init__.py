"""The tiny world (lessons 04-05): a generated corpus, task data with checkable scores, and the
few-million-parameter model in ``weights/tiny`` pretrained on it by ``python -m minitune.tiny.build``."""

from .tasks import (contains_answer, eval_set, exact_match, preference_pairs, preference_score, score,
                    sft_records)

__all__ = ["contains_answer", "eval_set", "exact_match", "preference_pairs", "preference_score", "score",
           "sft_records"]
