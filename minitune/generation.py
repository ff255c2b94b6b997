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

`static_cache=True` runs `static_decode_loop` instead: the same loop over a pre-allocated cache
(model/static_cache.py) whose decode step has the same shapes at every token, and with
`cuda_graph=True` (CUDA only) that step is recorded once as a CUDA graph and replayed per token, so
the host no longer launches each small kernel. Same tokens as the plain loop (tests/test_static_cache.py).
"""

from contextlib import contextmanager, nullcontext

import torch

from .errors import UserError
from .model.kv_cache import KVCache
from .model.static_cache import CUDAGraphStep, StaticKVCache, decode_step, prefill
from .model.transformer import Transformer


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
             on_token=None, fast_decode: bool = True, static_cache: bool | StaticKVCache = False,
             cuda_graph: bool = False) -> torch.Tensor:
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

    static_cache: True decodes with a pre-allocated cache of prompt + max_new_tokens columns and a
    fixed-shape step (`static_decode_loop`); a StaticKVCache passed here is reused, with the CUDA graph
    captured on it, by every call that fits it. cuda_graph: replay that step as a CUDA graph (a CUDA
    device only; implies a static cache). Same tokens as the plain loop.
    """
    room = context_room(model, input_ids, attention_mask)
    if room is not None:
        max_new_tokens = min(max_new_tokens, room)
    with matvec_layout(model) if fast_decode else nullcontext():
        if not static_cache and not cuda_graph:  # the plain loop, as lesson 03 reads it
            return decode_loop(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_id, attention_mask,
                               seed, on_token)
        cache = static_cache if isinstance(static_cache, StaticKVCache) else None
        return static_decode_loop(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_id,
                                  attention_mask, seed, on_token, cache, cuda_graph)


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


def static_cache_for(model, input_ids: torch.Tensor, max_new_tokens: int, cache: StaticKVCache | None,
                     cuda_graph: bool) -> StaticKVCache:
    """The cache a static generation writes: `cache` if given and it fits, else a new one that fits
    exactly. A misfit is a GenerationError that names what it holds and what was asked."""
    if not isinstance(model, Transformer) or getattr(model, "num_virtual_tokens", 0):
        raise GenerationError(f"static_cache / cuda_graph decode a plain minitune Transformer (LoRA layers inside "
                              f"it are fine), not a {type(model).__name__} (expected static_cache=False)")
    device = model.model.embed_tokens.weight.device
    if cuda_graph and device.type != "cuda":
        raise GenerationError(f"cuda_graph=True needs the model on a CUDA device; it is on {device} "
                              f"(expected cuda_graph=False, or the model moved to cuda)")
    B, T = input_ids.shape
    if cache is None:
        return StaticKVCache.for_model(model, B, T + max_new_tokens)
    if cache.batch != B:
        raise GenerationError(f"the static cache holds a batch of {cache.batch} rows; the prompts are {B} rows "
                              f"(expected a cache made for batch {B})")
    cfg, w = model.config, model.model.embed_tokens.weight
    made_for = (cache.keys.shape[0], cache.keys.shape[2], cache.keys.shape[4], cache.keys.dtype, cache.keys.device)
    needed = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, w.dtype, w.device)
    if made_for != needed:
        raise GenerationError(f"the static cache has (layers, kv_heads, head_dim, dtype, device) = {made_for}; the "
                              f"model needs {needed} (expected StaticKVCache.for_model(model, ...))")
    if T + max_new_tokens > cache.max_len:
        raise GenerationError(f"the prompt ({T} columns) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} "
                              f"positions do not fit the static cache's {cache.max_len} (expected at most "
                              f"{cache.max_len} in all)")
    return cache


@torch.inference_mode()
def static_decode_loop(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, eos_id: int | list | None = None,
                       attention_mask: torch.Tensor | None = None, seed: int | None = None,
                       on_token=None, cache: StaticKVCache | None = None, cuda_graph: bool = False) -> torch.Tensor:
    """decode_loop over a static cache: prefill eagerly, then the same fixed-shape step every token
    (model/static_cache.py), replayed as a CUDA graph if cuda_graph. Picking tokens and stopping at EOS
    stay outside the step, exactly as in decode_loop."""
    B, T = input_ids.shape
    device = input_ids.device
    cache = static_cache_for(model, input_ids, max_new_tokens, cache, cuda_graph)
    if cuda_graph and (cache.graph is None or cache.graph.model is not model):
        cache.graph = CUDAGraphStep(model, cache)  # once per cache: later generations replay it
    step_fn = cache.graph if cuda_graph else (lambda ids, pos, col: decode_step(model, cache, ids, pos, col))
    eos_ids = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), device=device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T] counts real tokens only
    column = torch.full((1,), T, dtype=torch.long, device=device)  # the cache column the next token goes to

    step_ids, out = input_ids, [input_ids]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if step == 0:
            logits = prefill(model, cache, input_ids, attention_mask, position_ids)
        else:
            logits = step_fn(step_ids, position_ids, column)
            column += 1
        tok = next_token(logits, temperature, top_k, top_p, generator)  # [B]
        if len(eos_ids):
            tok = torch.where(finished, eos_ids[0], tok)
            finished |= torch.isin(tok, eos_ids)
        step_ids = tok[:, None]
        out.append(step_ids)
        if on_token is not None:
            on_token(tok)
        if len(eos_ids) and bool(finished.all()):
            break
        position_ids = position_ids[:, -1:] + 1
    return torch.cat(out, dim=1)
