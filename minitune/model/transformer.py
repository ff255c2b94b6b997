"""A decoder-only transformer in the LLaMA / Qwen2 / Qwen3 layout, in one screen per idea.

    x = embed(ids)
    for each block:   x = x + Attention(RMSNorm(x))      # pre-norm residual stream
                      x = x + SwiGLU(RMSNorm(x))
    logits = lm_head(RMSNorm(x))

Module and parameter names are exactly Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...),
so a checkpoint's state dict loads without renaming and PEFT adapter names line up with ours.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kv_cache import KVCache
from .rope import apply_rope, rope_cos_sin, rope_inv_freq


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): y = w * x / sqrt(mean(x^2) + eps).

    Unlike LayerNorm it neither subtracts the mean nor adds a bias. The statistics are taken in
    float32 even for bf16 weights; the result is cast back before the weight multiplies it,
    in the same order as the reference implementation so bf16 outputs agree bit for bit.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # BEGIN EXERCISE 02.1: RMSNorm forward
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
        # END EXERCISE


@dataclass
class AttentionInputs:
    """What every layer's attention reads besides x, computed once per forward and shared by all blocks.

    cos, sin: RoPE angles [B, 1, T, head_dim]; mask: boolean [B, 1, T, past+T] or None;
    is_causal: let SDPA apply its own causal mask (no padding, no cache).
    """
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None = None
    is_causal: bool = False


class Attention(nn.Module):
    """Causal self-attention with grouped-query attention (GQA, Ainslie et al. 2023).

    softmax(q k^T / sqrt(d) + causal mask) v, where `num_key_value_heads` < `num_attention_heads`
    lets each group of query heads share one key/value head: the KV cache shrinks by that factor.
    Qwen2 adds a bias to q/k/v; Qwen3 instead RMS-normalises q and k per head ("QK-norm").
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm  # a flag, not hasattr(self, "q_norm"): nn.Module's failed lookup is slow
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    # The one switch between the textbook RoPE (q and k each rotated, as the equation and transformers
    # write it) and the speed variant (q and k rotated as one concatenated tensor: when decoding one
    # token each small op costs more than its arithmetic, and one rotation is 5 ops fewer than two).
    # Same numbers bit for bit: RoPE is elementwise per head, so concatenating along heads changes no
    # arithmetic (tests/test_fast_paths.py). True by default, as the lessons' timings were measured with it.
    fused_rope: bool = True

    def forward(self, x, inputs: AttentionInputs, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        cos, sin = inputs.cos, inputs.sin
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, d]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, kv_heads, T, d]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if not self.fused_rope:  # the textbook way: rotate q, rotate k
            q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, T, d]
            k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, kv_heads, T, d]
        else:  # the speed variant: one rotation of [q; k] along the head axis
            qk = apply_rope(torch.cat((q, k), dim=2).transpose(1, 2), cos, sin)  # [B, H + kv_heads, T, d]
            q, k = qk.split_with_sizes((self.n_heads, self.n_kv), dim=1)  # Tensor.split adds a Python layer
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, kv_heads, past + T, d]
        # BEGIN EXERCISE 02.3: grouped-query attention
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, is_causal=inputs.is_causal,
                                           enable_gqa=self.n_kv != self.n_heads)
        # END EXERCISE
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down( silu(gate(x)) * up(x) )."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        # BEGIN EXERCISE 02.4: the SwiGLU feed-forward
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # END EXERCISE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, inputs: AttentionInputs, cache: KVCache | None = None, layer: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), inputs, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask: torch.Tensor, past: int, T: int) -> torch.Tensor:
    """[B, past+T] padding mask (1 = real token) -> boolean [B, 1, T, past+T] for SDPA.

    Query i (at absolute position past+i) may see key j if j is real and j <= past+i. A padding
    query would then see nothing, and softmax over nothing is NaN, which would leak into later
    layers through its key/value; so every query may also see itself.
    """
    S = past + T
    q_pos = torch.arange(past, S, device=attention_mask.device)[:, None]  # [T, 1]
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # [1, S]
    mask = (k_pos <= q_pos) & attention_mask.bool()[:, None, None, :]  # [B, 1, T, S]
    return mask | (k_pos == q_pos)


class Transformer(nn.Module):
    """The causal language model: token ids [B, T] -> next-token logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # _weight=empty skips nn.Embedding's own normal_() init: _init_weights below does it, and on
        # the meta device (checkpoint loading) that init takes seconds for nothing
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        # plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(m, std=0.02):
        """GPT-2 style init for training from scratch; checkpoints overwrite it."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden_states(self, input_ids=None, attention_mask=None, position_ids=None,
                      cache: KVCache | None = None, inputs_embeds=None):
        """The final-norm output [B, T, hidden]: what the LM head and a reward head both read.

        attention_mask: [B, past+T] with 0 on (left) padding; position_ids default to past..past+T-1.
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)

        # cheapest correct mask: none for one new token, SDPA's built-in causal one without padding
        mask, is_causal = None, False
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask_4d(attention_mask, past, T)
        elif past == 0:
            is_causal = T > 1
        elif T > 1:
            mask = attention_mask_4d(torch.ones(B, past + T, dtype=torch.bool, device=x.device), past, T)

        inputs = AttentionInputs(cos, sin, mask, is_causal)
        for i, block in enumerate(self.model.layers):
            x = block(x, inputs, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                cache: KVCache | None = None, inputs_embeds=None):
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache, inputs_embeds))

    def num_parameters(self, trainable_only: bool = False) -> int:
        """The model's own convenience count (a tied weight once), like transformers' `num_parameters`.

        For a model wrapped by PEFT, `minitune.peft.count_parameters` is the counter to use;
        `minitune.memory.count_parameters(cfg)` gives the same total from the config alone.
        """
        seen, total = set(), 0
        for p in self.parameters():  # parameters() already skips the tied duplicate
            if id(p) not in seen and (p.requires_grad or not trainable_only):
                seen.add(id(p))
                total += p.numel()
        return total
