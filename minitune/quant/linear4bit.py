"""A linear layer whose weight is stored in NF4 (the frozen base of QLoRA).

QLoRA (Dettmers et al. 2023) keeps the base model in 4 bits and computes in 16:

    y = x @ dequant(W_nf4)^T + b        (dequant to compute_dtype, e.g. bf16)

The full-precision W exists only for the duration of one matmul.  Autograd
would normally save the dequantized W for the backward pass (dL/dx = dL/dy @ W),
which would keep a 16-bit copy of every layer alive until backward; instead the
custom autograd function below saves nothing and dequantizes W again in
backward.  Gradients flow to x (and so to LoRA adapters upstream or beside the
layer) but never to the packed weights, which are uint8 buffers.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .nf4 import NF4Tensor, dequantize_nf4, nbytes, quantize_nf4
from .nf4_triton import dequantize_nf4_triton, triton_available


def dequantize_auto(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The Triton kernel for CUDA tensors when triton is importable, else the PyTorch reference
    (both give the same bits)."""
    if q.packed.is_cuda and triton_available():

        return dequantize_nf4_triton(q, dtype)
    return dequantize_nf4(q, dtype)


class _Matmul4bit(torch.autograd.Function):
    """y = F.linear(x, dequant(W), b); backward dequantizes W again instead of saving it."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.layer.dequantize(grad_out.dtype)  # dL/dx = dL/dy W
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class Linear4bit(nn.Module):
    """nn.Linear with an NF4 weight.  Buffers (move with .to(), saved in state_dict):
    weight_packed, weight_absmax and, with double quantization, weight_offset,
    weight_absmax2, weight_code2.  The bias stays in full precision (frozen)."""

    def __init__(self, q: NF4Tensor, bias: Optional[torch.Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight (out, in), got shape {tuple(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.weight_shape = q.shape
        self.weight_dtype = q.dtype  # dtype of the weight before quantization
        self.blocksize = q.blocksize
        self.compute_dtype = compute_dtype or q.dtype
        self.register_buffer("weight_packed", q.packed)
        self.register_buffer("weight_absmax", q.absmax)
        self.register_buffer("weight_offset", q.offset)
        self.register_buffer("weight_absmax2", q.absmax2)
        self.register_buffer("weight_code2", q.code2)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias shape {tuple(bias.shape)} != ({self.out_features},)")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None) -> "Linear4bit":
        """Quantize an nn.Linear's weight (on its own device); the result keeps no float copy."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        q = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(q, linear.bias, compute_dtype or linear.weight.dtype)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() casts every floating buffer; the float32
        # scales must not lose bits, so undo a dtype change (device moves still apply).
        before = {n: b for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The packed buffers are flat, so torch's own message ("weight_packed: copying [2048] into
        # [1024]") hides which weight shape the state dict came from; say it in the layer's terms.
        if prefix + "weight" in state_dict:
            raise ValueError(f"{prefix}weight: a 16-bit weight {tuple(state_dict[prefix + 'weight'].shape)} "
                             f"cannot load into a 4-bit layer; load the checkpoint with "
                             f"load_pretrained(path, quantize='nf4') or quantize the model after loading")
        for name, own in self._buffers.items():
            got = state_dict.get(prefix + name)
            if own is not None and got is not None and got.shape != own.shape:
                raise ValueError(
                    f"{prefix}{name}: the 4-bit state dict holds shape {tuple(got.shape)}, but this Linear4bit "
                    f"(out_features={self.out_features}, in_features={self.in_features}, blocksize={self.blocksize}, "
                    f"double_quant={self.double_quant}) needs {tuple(own.shape)}: it was quantized from a "
                    "different weight shape or block size (another model or config?)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def double_quant(self) -> bool:
        return self.weight_absmax2 is not None

    def quant_state(self) -> NF4Tensor:
        """The stored weight as an NF4Tensor (views of the buffers, no copy)."""
        return NF4Tensor(self.weight_packed, self.weight_absmax, self.weight_shape, self.weight_dtype,
                         self.blocksize, self.weight_offset, self.weight_absmax2, self.weight_code2)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight W_hat (out, in) in `dtype` (default: the dtype it had), e.g. to merge LoRA."""
        return dequantize_auto(self.quant_state(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)  # compute in 16 (or 32) bits, store in 4
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _Matmul4bit.apply(x, bias, self).to(in_dtype)

    def weight_nbytes(self) -> int:
        return nbytes(self.quant_state())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """`skip` entries match a module's full name or its trailing components."""
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                   skip: Iterable[str] = ("lm_head",),
                   compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every nn.Linear (except names in `skip`) by a Linear4bit, in place; return the model.

    Embeddings are never touched, and neither is a Linear whose weight is tied to an
    embedding (quantizing it would silently untie the two).  The new layers are frozen:
    their weights are uint8 buffers, their biases have requires_grad=False.
    """
    skip = tuple(skip)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if (isinstance(child, nn.Linear) and not _skipped(full, skip)
                    and id(child.weight) not in tied):
                targets.append((parent, child_name, child))
    for parent, child_name, child in targets:  # swap after walking: don't mutate while iterating
        setattr(parent, child_name,
                Linear4bit.from_linear(child, blocksize, double_quant, compute_dtype))
    return model


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The inverse swap: every Linear4bit becomes an nn.Linear holding dequant(W) in `dtype`
    (default: the dtype the weight had), e.g. to save a QLoRA result as a plain 16-bit checkpoint.
    The weights are the 4-bit approximation, not the original ones."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, Linear4bit)]
    for parent, name, q in targets:
        w = q.dequantize(dtype)
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if q.bias is not None:
                linear.bias.copy_(q.bias)
        setattr(parent, name, linear)
    return model
