"""Bottleneck adapters: small trainable MLPs inserted into a frozen model.

    adapter(h) = W_up act(W_down h + b_down) + b_up        W_down: [b, d], W_up: [d, b], b << d

* serial (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): after a sublayer,
  with its own skip connection,   y = f(x) + adapter(f(x))
* parallel (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning";
  as in LLM-Adapters, Hu et al. 2023): beside the sublayer, reading the sublayer's input,
                                  y = f(x) + s * adapter(x)

Here f is a block's `self_attn` or `mlp` and x its (already normalised) input, so for a pre-norm
block the residual stream becomes x + attn(norm(x)) + adapter(...). W_up and b_up start at zero:
adapter(.) = 0, so training starts exactly from the base model, yet W_down is random so the gradient
of W_up is not zero. Unlike LoRA an adapter cannot be merged into the weights (the nonlinearity),
so it costs a little latency at inference.

The adapter becomes a child `adapter` of the sublayer and is called from a forward hook; the base
modules keep their Hugging Face names, so base checkpoints still load and LoRA can sit beside it.
"""

import torch
import torch.nn as nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
SUBLAYERS = {"attn": "self_attn", "mlp": "mlp"}


class Adapter(nn.Module):
    """down -> act -> up, up zero-initialised. mode "serial" reads the sublayer output, "parallel" its input."""

    def __init__(self, dim: int, bottleneck: int, mode: str = "serial", activation: str = "relu",
                 scale: float = 1.0):
        super().__init__()
        self.mode, self.scale = mode, scale
        self.down = nn.Linear(dim, bottleneck)  # nn.Linear's Kaiming-uniform init
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):  # [B, T, d] -> [B, T, d]
        # BEGIN EXERCISE 08.1: the bottleneck adapter
        return self.scale * self.up(self.act(self.down(h)))
        # END EXERCISE


def _adapter_hook(module, args, out):
    """Forward hook on an adapted sublayer: add the adapter to what the sublayer returned."""
    adapter = module.adapter
    return out + adapter(out if adapter.mode == "serial" else args[0])


def apply_adapters(model, bottleneck: int = 64, mode: str = "serial", where=("attn", "mlp"),
                   activation: str = "relu", scale: float = 1.0):
    """Freeze `model` and put one adapter after (serial) or beside (parallel) each `where` sublayer
    of every block. Returns the model; only adapter parameters are trainable."""
    if not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or bottleneck <= 0:
        raise ValueError(f"bottleneck must be a positive int, got {bottleneck!r}")
    if mode not in ("serial", "parallel"):
        raise ValueError(f"mode must be 'serial' or 'parallel', got {mode!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    where = (where,) if isinstance(where, str) else tuple(where)
    if not where or any(w not in SUBLAYERS for w in where) or len(set(where)) != len(where):
        raise ValueError(f"where must name some of {sorted(SUBLAYERS)} once each, got {where!r}")
    if has_adapters(model):
        raise ValueError("model already has adapters; call remove_adapters first")

    model.requires_grad_(False)
    weight = model.lm_head.weight
    for block in model.model.layers:
        for w in where:
            sub = getattr(block, SUBLAYERS[w])
            sub.adapter = Adapter(model.config.hidden_size, bottleneck, mode, activation, scale).to(
                device=weight.device, dtype=weight.dtype)
            sub._adapter_handle = sub.register_forward_hook(_adapter_hook)
    return model


def has_adapters(model) -> bool:
    return any(isinstance(m, Adapter) for m in model.modules())


def remove_adapters(model):
    """Take every adapter out again (the base weights were never touched). Parameters stay frozen."""
    for m in model.modules():
        if isinstance(getattr(m, "adapter", None), Adapter):
            m._adapter_handle.remove()
            del m.adapter, m._adapter_handle
    return model


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by their full names (what a checkpoint of the fine-tune needs)."""
    return {k: v for k, v in model.state_dict().items() if ".adapter." in k}


def adapter_num_params(cfg, bottleneck: int, where=("attn", "mlp")) -> int:
    """layers * len(where) * (2 d b + b + d). LLaMA-7B (d = 4096, 32 layers), b = 64, both sublayers:
    32 * 2 * (2 * 4096 * 64 + 64 + 4096) = 33,820,672 (0.5% of 6.7B)."""
    where = (where,) if isinstance(where, str) else tuple(where)
    d = cfg.hidden_size
    return cfg.num_hidden_layers * len(where) * (2 * d * bottleneck + bottleneck + d)
