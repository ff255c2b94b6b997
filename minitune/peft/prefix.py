"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Freeze the whole model; learn, for every layer l, n "virtual" keys and values that every real token
can attend to, as if a prompt of n tokens had already been run through the model:

    attention_l(q) = softmax(q [P_k^l ; K]^T / sqrt(d)) [P_v^l ; V]        P_k^l, P_v^l: [kv_heads, n, d]

The prefix is never rotated by RoPE and has no query of its own: it lives only in the KV cache. So
we feed it in exactly there: `KVCache` is pre-filled with the prefix before the first real token,
and the real tokens then run as a continuation (positions n, n+1, ..., the mask sees n more keys).

Trainable parameters (PEFT's `PrefixEncoder`, names kept so its weights copy over):
  * direct:      embedding [n, 2 * layers * kv_dim]                              kv_dim = kv_heads * head_dim
  * reparameterised (`prefix_projection`, the paper's MLP for stable training):
                 embedding [n, kv_dim] -> Linear(kv_dim, h) -> Tanh -> Linear(h, 2 * layers * kv_dim)
The flat vector of one virtual token is laid out [layers, 2 (key, value), kv_heads, head_dim].
With grouped-query attention the prefix has kv_heads heads, not attention heads (as PEFT since #1901).

Placement matches PEFT 0.21 + transformers 5: the prefix goes in as the past of a DynamicCache, the
attention mask gets n ones in front, and default positions start at n (position ids given by the
caller are shifted by n).
"""

import torch
import torch.nn as nn

from ..model.kv_cache import KVCache


def _check_num_virtual_tokens(n):
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive int, got {n!r}")


class PrefixEncoder(nn.Module):
    """Virtual-token parameters -> flat prefix [n, 2 * layers * kv_dim] (PEFT's PrefixEncoder)."""

    def __init__(self, num_virtual_tokens: int, num_layers: int, kv_dim: int,
                 prefix_projection: bool = False, encoder_hidden_size: int | None = None):
        super().__init__()
        _check_num_virtual_tokens(num_virtual_tokens)
        self.prefix_projection = prefix_projection
        out = 2 * num_layers * kv_dim
        if prefix_projection:
            hidden = encoder_hidden_size or kv_dim  # PEFT's default: the token dim
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
        else:
            # N(0, 1) init, as nn.Embedding (and PEFT) does
            self.embedding = nn.Embedding(num_virtual_tokens, out)

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight  # [n, kv_dim] or [n, 2 * layers * kv_dim]
        return self.transform(x) if self.prefix_projection else x


class PrefixTuningModel(nn.Module):
    """A frozen `Transformer` plus trainable per-layer key/value prefixes.

    Same interface as the base model: `forward` -> logits [B, T, vocab] for the real tokens,
    `hidden_states`, `lm_head`, so `minitune.generate(PrefixTuningModel(base), ids, ...)` works.
    """

    def __init__(self, base, num_virtual_tokens: int, prefix_projection: bool = False,
                 encoder_hidden_size: int | None = None):
        super().__init__()
        _check_num_virtual_tokens(num_virtual_tokens)  # before freezing the caller's model
        cfg = base.config
        self.base = base.requires_grad_(False)
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers, self.kv_heads, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.prompt_encoder = PrefixEncoder(num_virtual_tokens, self.num_layers, self.kv_heads * self.head_dim,
                                            prefix_projection, encoder_hidden_size)
        self.prompt_encoder.to(next(base.parameters()).device)

    @property
    def lm_head(self):
        return self.base.lm_head

    @property
    def config(self):
        return self.base.config

    def get_prompt(self, batch_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The final prefix (PEFT `get_prompt`): per layer (keys, values), each [B, kv_heads, n, head_dim]."""
        # BEGIN EXERCISE 08.2: per-layer key/value prefixes
        n, L, H, d = self.num_virtual_tokens, self.num_layers, self.kv_heads, self.head_dim
        flat = self.prompt_encoder().to(self.base.lm_head.weight.dtype)  # [n, 2*L*H*d], in the model's dtype
        kv = flat.view(n, L, 2, H, d).permute(1, 2, 3, 0, 4)  # [L, 2, H, n, d]
        kv = kv[:, :, None].expand(L, 2, batch_size, H, n, d)  # one prefix shared by every row
        return [(kv[i, 0], kv[i, 1]) for i in range(L)]
        # END EXERCISE

    def hidden_states(self, input_ids=None, attention_mask=None, position_ids=None,
                      cache: KVCache | None = None, inputs_embeds=None):
        """Final-norm hidden states [B, T, hidden] of the real tokens.

        Without a cache (training, scoring) a cache holding only the prefix is made for this call.
        With an empty cache (the first call of `generate`) the prefix is written into it first, and the
        cache grows by n to make room; later calls find the prefix already there. `attention_mask`
        [B, past+T] and `position_ids` are given in the caller's frame, without the prefix.
        """
        x = input_ids if inputs_embeds is None else inputs_embeds
        B, T, n = x.shape[0], x.shape[1], self.num_virtual_tokens
        if cache is None:
            cache = KVCache(max_len=n + T)
        if cache.length == 0:
            if cache.keys:
                raise ValueError("cache has buffers but no positions; pass a fresh KVCache")
            cache.max_len += n  # generate() sized it for the real tokens only; buffers are allocated lazily
            for layer, (k, v) in enumerate(self.get_prompt(B)):
                cache.update(layer, k, v)
            cache.advance(n)
        if attention_mask is not None:  # every row sees the whole prefix
            attention_mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], dim=1)
        if position_ids is not None:
            position_ids = position_ids + n
        return self.base.hidden_states(input_ids, attention_mask, position_ids, cache, inputs_embeds)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                cache: KVCache | None = None, inputs_embeds=None):
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache, inputs_embeds))


def prefix_tuning_num_params(cfg, num_virtual_tokens: int, prefix_projection: bool = False,
                             encoder_hidden_size: int | None = None) -> int:
    """Trainable parameters, by formula. LLaMA-7B (32 layers, 32 kv heads x 128), n = 20, direct:
    20 * 2 * 32 * 4096 = 5,242,880 (0.08% of 6.7B)."""
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    out = 2 * cfg.num_hidden_layers * kv_dim
    if not prefix_projection:
        return num_virtual_tokens * out
    h = encoder_hidden_size or kv_dim
    return num_virtual_tokens * kv_dim + (kv_dim * h + h) + (h * out + out)
