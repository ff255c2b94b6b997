"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p.

    prefill: run the whole prompt once, keep every layer's keys/values in the cache
    decode:  feed only the newest token; it attends to the cached keys/values
             logits -> (temperature, top-k, top-p) -> pick the next token -> repeat

A batch of prompts of different lengths is left-padded, so every row's newest token sits in the
same column; `attention_mask` (1 = real token) keeps padding out of attention, and position ids
count real tokens only, so a padded prompt gets the same positions as the unpadded one.

A model knows positions up to its context, `max_position_embeddings`; past it RoPE still computes
angles, but for positions the model never saw in training, and the text turns to garbage without
any error. So a prompt that fills the context is refused, and generation stops at the context.

`decode_loop` is the plain loop above; `generate` checks the context and runs it. Its one speed
switch, `fast_decode=True` (the default, so the lessons' timings stay as measured), wraps the loop
in `matvec_layout`, which stores the CPU fp32 linear weights column by column while decoding;
`fast_decode=False` runs the loop as written. Both give the same tokens (tests/test_fast_paths.py).
"""

from contextlib import contextmanager, nullcontext

import torch

from .errors import UserError
from .model.kv_cache import KVCache


class GenerationError(UserError):
    """A prompt the model cannot continue, e.g. one longer than its context."""


def positions_used(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    """Positions the longest prompt of the batch takes: its real tokens (left padding takes none),
    plus the virtual tokens of prompt / prefix tuning (minitune.peft.prompt, .prefix), which sit
    at positions 0..n-1 and push the real ones up by n."""
    real = input_ids.shape[1] if attention_mask is None else int(attention_mask.sum(-1).max())
    return real + getattr(model, "num_virtual_tokens", 0)


def context_room(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int | None:
    """How many new tokens fit before the model's context is full; None for a model without a config.

    A prompt that leaves no room is a GenerationError that says how long it is and how long the context is.
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is None:
        return None
    used = positions_used(model, input_ids, attention_mask)
    if used >= context:
        virtual = getattr(model, "num_virtual_tokens", 0)
        with_virtual = f" with the {virtual} virtual tokens of prompt or prefix tuning" if virtual else ""
        raise GenerationError(f"the prompt is {used} tokens{with_virtual}; the model's context "
                              f"(max_position_embeddings) is {context} tokens (expected a prompt of at most "
                              f"{context - 1 - virtual} tokens, to leave room for a reply)")
    return context - used


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf."""
    # BEGIN EXERCISE 03.3: top_k_filter
    kth = torch.topk(logits, min(k, logits.shape[-1])).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))
    # END EXERCISE


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens whose probability
    reaches p. Sorted ascending, a token is dropped when the mass *below and at* it is <= 1 - p;
    the most likely token always stays."""
    # BEGIN EXERCISE 03.1: top_p_filter (nucleus sampling)
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum <= 1 - p
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # END EXERCISE


def next_token(logits: torch.Tensor, temperature=0.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """logits [B, vocab] (float32) -> token ids [B]. temperature 0 means greedy (argmax)."""
    if not temperature:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@contextmanager
def matvec_layout(model):
    """The speed variant behind `generate(..., fast_decode=True)`: on CPU, store each fp32 linear
    weight [out, in] column by column while decoding, then put it back.

    Same shape, same values, only the memory order changes (`w.t().contiguous().t()`). Decoding
    multiplies one row by every weight; F.linear computes x @ w.T, and with this order w.T is a
    plain row-major matrix, so BLAS runs its fast untransposed product: 2.4x faster for one row
    times the bench model's [256, 688] weights on our CPU. The weights are restored afterwards, so
    training after generation runs exactly as it would have (two copies of the weights per call:
    milliseconds for the models trained on a CPU).
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.device.type == "cpu"
               and m.weight.dtype == torch.float32 and m.weight.is_contiguous() and min(m.weight.shape) > 1]
    weights = list({id(m.weight): m.weight for m in linears}.values())  # a tied weight once
    with torch.no_grad(), torch.inference_mode(False):  # storage made here must stay usable by autograd
        for w in weights:
            w.data = w.data.t().contiguous().t()
        try:
            yield
        finally:
            for w in weights:
                w.data = w.data.contiguous()


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | list | None = None,
             attention_mask: torch.Tensor | None = None, seed: int | None = None,
             on_token=None, fast_decode: bool = True) -> torch.Tensor:
    """Continue each row of input_ids [B, T]; returns [B, T + new] with new <= max_new_tokens.

    Rows that emit an EOS id are finished: later columns are filled with that EOS id (the same
    convention as transformers when no pad id is set) and generation stops once all rows are done.
    `on_token(ids [B])` is called with each new column, e.g. to stream text to a terminal.

    A prompt as long as the model's context (`config.max_position_embeddings`, counting the virtual
    tokens of prompt or prefix tuning) or longer raises GenerationError; otherwise generation stops
    when the context is full: max_new_tokens is cut to what fits, never refused (a batch of rollouts
    keeps going; `minitune generate` and `minitune chat` refuse such a prompt before they call this).

    fast_decode: the speed switch; True (the default) lays the CPU weights out for one-row matvecs while
    decoding (`matvec_layout`), False runs the plain loop. Same tokens either way.
    """
    room = context_room(model, input_ids, attention_mask)
    if room is not None:
        max_new_tokens = min(max_new_tokens, room)
    with matvec_layout(model) if fast_decode else nullcontext():
        return decode_loop(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_id, attention_mask, seed,
                           on_token)


@torch.inference_mode()
def decode_loop(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, eos_id: int | list | None = None,
                attention_mask: torch.Tensor | None = None, seed: int | None = None,
                on_token=None) -> torch.Tensor:
    """The plain KV-cache loop: prefill the prompt once, then feed one token at a time."""
    B, T = input_ids.shape
    device = input_ids.device
    eos_ids = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), device=device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T] counts real tokens only
    padded = not bool(attention_mask.all())

    cache = KVCache(max_len=T + max_new_tokens)
    step_ids, out = input_ids, [input_ids]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        hidden = model.hidden_states(step_ids, attention_mask if padded else None, position_ids, cache)
        logits = model.lm_head(hidden[:, -1]).float()  # only the last position needs the vocab projection
        tok = next_token(logits, temperature, top_k, top_p, generator)  # [B]
        if len(eos_ids):
            tok = torch.where(finished, eos_ids[0], tok)
            finished |= torch.isin(tok, eos_ids)
        step_ids = tok[:, None]
        out.append(step_ids)
        if on_token is not None:
            on_token(tok)
        if len(eos_ids) and bool(finished.all()):  # without an EOS id nothing can finish early
            break
        position_ids = position_ids[:, -1:] + 1
        if padded:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
    return torch.cat(out, dim=1)
