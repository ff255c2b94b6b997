"""Perplexity of a text file, with a sliding window (`minitune eval` with `task: ppl`).

    PPL = exp( -1/(N-1) * sum_{t=1}^{N-1} log p(x_t | x_<t) )

over the file's N tokens (encoded as one text, no special tokens added; the first token has nothing
to be predicted from, so N-1 are scored). A model sees at most `window` tokens at once, so a long
text is read in windows that start every `stride` tokens (the strided method of Hugging Face's
"Perplexity of fixed-length models" guide):

    window k covers tokens [k*stride, k*stride + window) and scores only the tokens the previous
    window did not reach, so every token is scored exactly once, with at least window - stride
    tokens of context before it (fewer only at the start of the text).

stride = window scores disjoint chunks (fast; tokens early in a chunk see little context);
stride = 1 gives each token the full window (exact for the window, one forward per token). The
default, window // 2, sits between. Lower is better; a model that guesses uniformly over a V-token
vocabulary scores V.
"""

from __future__ import annotations

import math
from pathlib import Path

from .batching import target_logprobs
from .benchmark import BenchmarkError


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored token) of each window over n tokens; every token 1..n-1 once."""
    if not 1 <= stride <= window:
        raise BenchmarkError(f"ppl_stride {stride}: expected 1 <= stride <= window ({window})")
    out, scored_to, begin = [], 1, 0
    while scored_to < n:
        end = min(begin + window, n)
        out.append((begin, end, scored_to))
        scored_to, begin = end, begin + stride
    return out


def perplexity(model, ids: list[int], window: int, stride: int, batch_size: int = 4, pad_id: int = 0,
               progress=None) -> dict:
    """{"ppl", "nll" (mean, nats per token), "tokens" (scored), "windows"} of one token sequence."""
    if len(ids) < 2:
        raise BenchmarkError(f"task ppl: the text has {len(ids)} token(s); at least 2 are needed")
    spans = windows(len(ids), window, stride)
    total, count = 0.0, 0
    for i in range(0, len(spans), batch_size):
        batch = spans[i:i + batch_size]
        rows, starts = [ids[b:e] for b, e, _ in batch], [s - b for b, _, s in batch]
        for lp in target_logprobs(model, rows, starts, pad_id):
            total, count = total - lp.double().sum().item(), count + len(lp)
        if progress is not None:
            progress.update(len(batch))
    assert count == len(ids) - 1, (count, len(ids))  # every token but the first, once
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": len(spans),
            "window": window, "stride": stride}


def file_perplexity(model, tok, path, window: int | None = None, stride: int | None = None, batch_size: int = 4,
                    progress_factory=None) -> dict:
    """Perplexity of a UTF-8 text file; window defaults to the model's context, stride to window // 2."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: task ppl needs task_dir to name a text file (no such file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    context = model.config.max_position_embeddings - getattr(model, "num_virtual_tokens", 0)
    window = window or context
    if window > context:
        raise BenchmarkError(f"cutoff_len {window}: the window is longer than the model's context of {context}")
    stride = stride or max(1, window // 2)
    ids = tok.encode(text)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    n_windows = len(windows(len(ids), window, stride)) if len(ids) > 1 else 0
    progress = progress_factory(n_windows) if progress_factory else None
    result = perplexity(model, ids, window, stride, batch_size, pad, progress)
    if progress is not None:
        progress.close()
    return {**result, "file": str(path)}
