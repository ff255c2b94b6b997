"""QLoRA: LoRA on a frozen 4-bit base (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs", arXiv 2305.14314). Lesson 09.

The base weight W0 is stored in NF4 (minitune.quant.Linear4bit) and only the adapter trains:

    h = dequant(W0_nf4) x + b + s * B A dropout(x),      s = alpha / r

Gradients reach A and B (through x and the low-rank path) but never the packed uint8 base, so
training memory is the 4-bit base, plus A, B, their AdamW moments and the activations.

The 4-bit base cannot absorb B A in place: adding a float update to 4-bit codes would quantize
it away (or need a re-quantization, which changes every weight of the layer). So merging is a
one-way trip to 16 bits: `merge_and_dequantize` dequantizes W0, adds s B A in float32, and
returns plain nn.Linear layers, a normal checkpoint for `minitune.save_pretrained`.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.linear4bit import Linear4bit, dequantize_model
from .lora import LoRALinear, apply_lora, lora_layers


class QLoRALinear(LoRALinear):
    """A Linear4bit plus LoRA's low-rank path: y = base_layer(x) + s * B(A(dropout(x))).

    Same parameters, names and initialisation as LoRALinear (so adapters save and load in PEFT's
    layout). A and B are float32 whatever the compute dtype (as PEFT does for 4-bit bases): they
    are the only weights that train, and AdamW updates to bf16 weights would round away."""

    def __init__(self, base_layer: Linear4bit, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        nn.Module.__init__(self)  # LoRALinear.__init__ reads base_layer.weight, which a 4-bit layer lacks
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base_layer.weight_packed.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False  # never True: see merge()

    def forward(self, x):  # x [..., in] -> [..., out]
        # BEGIN EXERCISE 09.2: LoRA on a 4-bit base
        y = self.base_layer(x)  # dequantize W0 for this matmul only; no gradient reaches the uint8 codes
        h = F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x
        h = h.to(self.lora_A.weight.dtype)
        # scale the thin [..., r] activation rather than the wide [..., out] one
        return y + F.linear(F.linear(h, self.lora_A.weight) * self.scaling, self.lora_B.weight).to(y.dtype)
        # END EXERCISE

    def merge(self):
        raise ValueError("cannot merge LoRA into a 4-bit base in place (the update would be rounded away by "
                         "the 4-bit codes); use minitune.peft.qlora.merge_and_dequantize(model, dtype=torch.bfloat16), "
                         "which returns a 16-bit model with W = dequant(W0) + s B A")

    def unmerge(self):
        pass  # never merged

    def merged_linear(self, dtype: torch.dtype) -> nn.Linear:
        """nn.Linear with W = dequant(W0) + s B A (added in float32, rounded once to `dtype`) and the bias."""
        base = self.base_layer
        with torch.no_grad():
            w = base.dequantize(torch.float32) + self.delta_weight().float()
            linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                               device=w.device, dtype=dtype)
            linear.weight.copy_(w)
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear.requires_grad_(False)


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def merge_and_dequantize(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The QLoRA model as a plain `dtype` model, in place: every QLoRALinear becomes an nn.Linear
    holding dequant(W0) + s B A, every other LoRALinear is merged and unwrapped, every remaining
    Linear4bit is dequantized, and the rest (embeddings, norms) is cast to `dtype`.

    The state-dict names are then the base model's (`...q_proj.weight`), so
    `minitune.save_pretrained` writes a checkpoint transformers loads. The base weights are the
    4-bit approximation of the original ones: saving cannot bring the lost bits back.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"merge_and_dequantize: dtype must be float32, float16 or bfloat16, got {dtype}")
    for name, layer in lora_layers(model).items():
        if isinstance(layer, QLoRALinear):
            _replace(model, name, layer.merged_linear(dtype))
        else:  # LoRA on a 16-bit layer (one that was not quantized): fold in float32, then unwrap
            base = layer.base_layer
            base.weight.copy_((base.weight.float() + layer.delta_weight().float()).to(base.weight.dtype))
            _replace(model, name, base)
    dequantize_model(model, dtype)
    model.to(dtype)
    if hasattr(model, "config") and hasattr(model.config, "torch_dtype"):
        model.config.torch_dtype = str(dtype).replace("torch.", "")
    return model.requires_grad_(False)


def load_qlora(path, r: int = 8, alpha: float = 16, dropout: float = 0.0, targets="all-linear",
               device="cpu", dtype: torch.dtype = torch.bfloat16, use_rslora: bool = False):
    """(model, tokenizer) ready for QLoRA training: the checkpoint at `path` loaded straight into
    NF4 with double quantization (layer by layer, so a model bigger than memory in 16 bits still
    loads) with `dtype` as the compute dtype, then LoRA (float32 A and B) applied on top.

    The Python equivalent of LLaMA-Factory's `finetuning_type: lora` + `quantization_bit: 4`.
    """
    from .. import load_pretrained  # lazily: minitune/__init__ imports the model package

    model, tok = load_pretrained(path, device=device, dtype=dtype, quantize="nf4")
    apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=targets, use_rslora=use_rslora)
    return model, tok
