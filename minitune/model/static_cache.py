"""A static KV cache and a decode step with fixed shapes, so one token's work can be a CUDA graph.

Why decoding one token at a time is slow on a GPU. Per step (one new token for each of B rows) the
GPU must read every weight once and every cached key/value once:

    bytes/step = weight bytes + 2 * layers * B * kv_heads * length * head_dim * bytes per value
    tokens/s  <= B * bandwidth / bytes/step                                   (the bandwidth bound)

(Pope et al. 2022, "Efficiently Scaling Transformer Inference": at small batch, decoding is bound
by reading the weights and the cache, not by arithmetic.) A Qwen2.5-0.5B shape in bf16 holds ~1 GB
of weights: ~0.3 ms a token at an H100's ~3 TB/s copy speed. Eager PyTorch decodes it at ~20 ms a
token, because the host launches the step's ~800 small kernels (24 layers x ~30 ops: projections,
RoPE, norms, attention, adds) one by one, each after ~10-30 us of Python and driver work, while the
GPU idles between them. At batch 1 the bound is the host's launch rate, not memory bandwidth.

A CUDA graph (torch.cuda.CUDAGraph) records those kernel launches once and replays the whole list
with one launch. Replay reuses the recorded kernels with the recorded arguments, so every tensor the
step reads or writes must keep its address and its shape from one token to the next. The dynamic
cache (kv_cache.py) breaks both: attention reads keys[:, :, :length], a shape that grows each token,
and the mask depends on it. Hence this file:

  * StaticKVCache: keys and values [layers, B, kv_heads, max_len, head_dim] allocated once; a step
    writes its keys/values at the cache columns given as a tensor (index_copy_), never at a Python
    int, so the column is an input of the graph, not a constant baked into it;
  * attention always reads all max_len columns, with a boolean mask [B, 1, T, max_len] built on the
    device from `key_mask` [B, max_len] (1 = a real token was written there): a column not yet
    written, or left padding, gets probability exactly 0, so the result is the dynamic cache's up to
    the order of the sums (tests/test_static_cache.py: same tokens, logits within 1e-5);
  * decode_step: nothing in it reads a value back to the host (no .item(), no bool(tensor)), so the
    host never waits for the GPU and the graph holds the whole step.

The price of fixed shapes: every step reads all max_len columns, written or not, so size the cache
to what the generation needs (prompt + new tokens), not to the model's context.

Capture: by hand, with torch.cuda.CUDAGraph (CUDAGraphStep below), not torch.compile's
mode="reduce-overhead". Hand capture replays exactly the eager kernels of decode_step, so its
numbers are decode_step's, there is no compiler between the code a student reads and what runs
(this project uses none), and capturing takes one step's time, not the minutes of compiling a
24-layer model. What it leaves on the table is fusion: a compiler would also merge the small
element-wise kernels (norms, RoPE, SwiGLU), which a graph still runs one by one (a few us each);
bench/bench_decode_gpu.py measures torch.compile(decode_step, mode="reduce-overhead") beside it.
"""

import torch
import torch.nn as nn

from .rope import rope_cos_sin
from .transformer import AttentionInputs, Transformer


class StaticKVCache(nn.Module):
    """Keys and values [layers, B, kv_heads, max_len, head_dim], written in place at tensor columns.

    An nn.Module with buffers (not a plain object) so `.to(device)` moves it and torch.compile treats
    the buffers as fixed storage that a step may update in place.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        super().__init__()
        self.batch, self.max_len = batch, max_len
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # key_mask[b, j]: a real token's key/value sits at column j of row b (not padding, not unwritten)
        self.register_buffer("key_mask", torch.zeros(batch, max_len, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=device), persistent=False)  # column numbers
        self.columns = self.slots[:0]  # the columns the current forward writes, set by static_forward
        self.graph = None  # a CUDAGraphStep captured on this cache, reused by later generations

    @classmethod
    def for_model(cls, model: Transformer, batch: int, max_len: int) -> "StaticKVCache":
        cfg, w = model.config, model.model.embed_tokens.weight
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim, w.dtype, w.device)

    def reset(self):
        """Forget every written column (keys/values stay as garbage: masked out until overwritten)."""
        self.key_mask.zero_()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this forward's k, v [B, kv_heads, T, d] at `self.columns` [T]; return the whole cache
        of this layer, [B, kv_heads, max_len, d] (the same shape every step)."""
        self.keys[layer].index_copy_(2, self.columns, k)
        self.values[layer].index_copy_(2, self.columns, v)
        return self.keys[layer], self.values[layer]


def static_forward(model: Transformer, cache: StaticKVCache, ids: torch.Tensor, position_ids: torch.Tensor,
                   columns: torch.Tensor) -> torch.Tensor:
    """ids [B, T] written at cache columns [T] -> the last position's logits [B, vocab], float32.

    cache.key_mask must already mark which of `columns` hold real tokens. Query i (at column c_i)
    sees column j if j holds a real token and j <= c_i, and always sees itself (a padding query that
    saw nothing would give softmax over nothing: NaN), as attention_mask_4d in transformer.py.
    """
    x = model.model.embed_tokens(ids)  # [B, T, hidden]
    if model.inv_freq.device != x.device:
        model.inv_freq = model.inv_freq.to(x.device)
    cos, sin = rope_cos_sin(model.inv_freq, position_ids, x.dtype)  # [B, 1, T, d]
    col = columns[:, None]  # [T, 1]
    mask = (cache.key_mask[:, None, None, :] & (cache.slots <= col)) | (cache.slots == col)  # [B, 1, T, max_len]
    cache.columns = columns
    inputs = AttentionInputs(cos, sin, mask)
    for i, block in enumerate(model.model.layers):
        x = block(x, inputs, cache, i)
    return model.lm_head(model.model.norm(x[:, -1])).float()  # only the last position needs the vocab


def prefill(model: Transformer, cache: StaticKVCache, ids: torch.Tensor, attention_mask: torch.Tensor,
            position_ids: torch.Tensor) -> torch.Tensor:
    """The prompt ids [B, T] (left-padded; attention_mask 1 = real) into columns 0..T-1; shapes vary
    with T, so this part runs eagerly, once per generation."""
    T = ids.shape[1]
    cache.reset()
    cache.key_mask[:, :T] = attention_mask.bool()
    return static_forward(model, cache, ids, position_ids, cache.slots[:T])


def decode_step(model: Transformer, cache: StaticKVCache, ids: torch.Tensor, position_ids: torch.Tensor,
                column: torch.Tensor) -> torch.Tensor:
    """One new token per row, ids [B, 1] at position_ids [B, 1], written at cache column [1] (a tensor).

    Every shape is the same at every step and nothing is read back to the host: graph-ready.
    """
    cache.key_mask.index_fill_(1, column, True)  # the new token is real in every row
    return static_forward(model, cache, ids, position_ids, column)


class CUDAGraphStep:
    """decode_step recorded once as a CUDA graph; each call copies its inputs into the recorded
    buffers and replays the whole step with one launch. The returned logits [B, vocab] are the
    graph's own output buffer: read them before the next call overwrites them."""

    def __init__(self, model: Transformer, cache: StaticKVCache):
        self.model = model
        device = cache.keys.device
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)  # the graph's fixed inputs
        self.position_ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        # warm up on a side stream first: lazy allocations (cuBLAS workspaces) must not happen during capture
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                decode_step(model, cache, self.ids, self.position_ids, self.column)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the kernels; nothing runs
            self.logits = decode_step(model, cache, self.ids, self.position_ids, self.column)
        cache.reset()  # the warm-up wrote column 0: forget it

    def __call__(self, ids: torch.Tensor, position_ids: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.position_ids.copy_(position_ids)
        self.column.copy_(column)
        self.graph.replay()
        return self.logits
