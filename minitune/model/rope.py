"""Rotary position embedding (RoPE), Su et al. 2021, "RoFormer".

Each pair of channels (i, i + d/2) of a query or key at position m is rotated by the angle
m * theta_i, with theta_i = base^(-2i/d). A dot product q_m . k_n then depends only on m - n:

    rope(x)_m = x_m * cos(m theta) + rotate_half(x_m) * sin(m theta)
    rotate_half([x1, x2]) = [-x2, x1]

Long-context checkpoints stretch the angles ("rope scaling"):
  * linear: theta_i / factor for every channel (position interpolation, Chen et al. 2023);
  * llama3: Meta's LLaMA-3.1 rule: slow channels (wavelength > original_ctx / low_freq_factor) are
    divided by `factor`, fast ones (wavelength < original_ctx / high_freq_factor) are kept, and the
    band between is a smooth blend of the two.
"""

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The per-channel-pair frequencies theta_i, float32, shape [head_dim // 2], on the CPU
    (also inside a `torch.device("meta")` block: they are computed, never loaded)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, old_ctx = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        wavelen = 2 * math.pi / inv_freq
        # slow channels see positions past the trained context: interpolate them fully
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin of m * theta_i for each position; position_ids [B, T] -> two [B, 1, T, head_dim]
    (the 1 broadcasts over attention heads; computed once per forward, shared by every layer)."""
    # angles in float32 even for bf16 models: m * theta needs more than 8 bits of mantissa
    angles = position_ids[:, None, :, None].float() * inv_freq.float()  # [B, 1, T, d/2]
    emb = torch.cat((angles, angles), dim=-1)  # [B, 1, T, d]: channels i and i + d/2 share an angle
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, d] by the angles in cos/sin [B, 1, T, d]."""
    # BEGIN EXERCISE 02.2: apply_rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    # END EXERCISE
