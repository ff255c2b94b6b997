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

import torch
import torch.nn as nn

from .. import load_pretrained  # the package root (minitune/__init__.py imports no peft module)
from ..quant.linear4bit import Linear4bit, dequantize_model
from .lora import LAYER_FOR_BASE, LoRALinear, apply_lora, lora_layers
from .targets import replace_module


class QLoRALinear(LoRALinear):
    """LoRALinear over a frozen 4-bit base: y = base_layer(x) + s * B(A(dropout(x))), where
    base_layer(x) dequantizes W0 (Linear4bit). apply_lora picks it for a Linear4bit base (LAYER_FOR_BASE).

    Same parameters, names and initialisation as LoRALinear (so adapters save and load in PEFT's
    layout). What is QLoRA's own: A and B are float32 whatever the compute dtype (as PEFT does for
    4-bit bases), since they are the only weights that train and AdamW updates to bf16 weights would
    round away; so the forward casts into and out of them. No fast path (LoRAFunction needs a float W0)."""

    adapter_dtype = torch.float32

    def forward(self, x):  # x [..., in] -> [..., out]
        # BEGIN EXERCISE 09.2: LoRA on a 4-bit base
        y = self.base_layer(x)  # dequantize W0 for this matmul only; no gradient reaches the uint8 codes
        h = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        # scale the thin [..., r] activation rather than the wide [..., out] one
        return y + self.lora_B(self.lora_A(h) * self.scaling).to(y.dtype)
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


LAYER_FOR_BASE[Linear4bit] = QLoRALinear


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
            replace_module(model, name, layer.merged_linear(dtype))
        else:  # LoRA on a 16-bit layer (one that was not quantized): fold in float32, then unwrap
            base = layer.base_layer
            base.weight.copy_((base.weight.float() + layer.delta_weight().float()).to(base.weight.dtype))
            replace_module(model, name, base)
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
    model, tok = load_pretrained(path, device=device, dtype=dtype, quantize="nf4")
    apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=targets, use_rslora=use_rslora)
    return model, tok
