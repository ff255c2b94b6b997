"""LoRAFunction's hand-written backward against autograd on the textbook formula
y = x W0^T + b + s (x A^T) B^T, and the paths LoRALinear takes around it (autocast, dropout)."""

import pytest
import torch
import torch.nn.functional as F

from minitune.peft import LoRALinear
from minitune.peft.lora import LoRAFunction

torch.set_num_threads(1)


def _layer(bias=True, in_f=12, out_f=10, r=4, alpha=8.0, dropout=0.0):
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(in_f, out_f, bias=bias), r, alpha, dropout)
    torch.nn.init.normal_(layer.lora_B.weight)  # B starts at 0; a nonzero B tests every gradient term
    layer.base_layer.requires_grad_(False)
    return layer


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    y = fn()
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))  # a gradient with no symmetry to hide a transpose
    return y.detach(), [None if t.grad is None else t.grad.clone() for t in tensors]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("base_trainable", [False, True])
def test_function_matches_autograd_on_the_formula(bias, base_trainable):
    layer = _layer(bias)
    layer.base_layer.requires_grad_(base_trainable)
    x = torch.randn(2, 5, 12, requires_grad=True)
    w0, b, a, bb = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight, layer.lora_B.weight
    tensors = [t for t in (x, w0, b, a, bb) if t is not None]
    got = _grads(lambda: layer(x), tensors)
    want = _grads(lambda: F.linear(x, w0, b) + layer.scaling * ((x @ a.T) @ bb.T), tensors)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)  # fp32: only the summation order differs
    for g, w in zip(got[1], want[1]):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_no_input_gradient_when_the_input_needs_none():
    layer = _layer()
    x = torch.randn(7, 12)  # e.g. the first layer's input: frozen embeddings
    layer(x).sum().backward()
    assert x.grad is None and layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None


def test_function_is_the_plain_formula_at_double_precision():
    torch.manual_seed(1)
    x, w0, b = torch.randn(6, 5, dtype=torch.double), torch.randn(4, 5, dtype=torch.double), torch.randn(4, dtype=torch.double)
    a, bb = torch.randn(3, 5, dtype=torch.double), torch.randn(4, 3, dtype=torch.double)
    inputs = [t.requires_grad_() for t in (x, w0, b, a, bb)]
    assert torch.autograd.gradcheck(lambda *t: LoRAFunction.apply(*t, 1.5), inputs)


def test_autocast_runs_the_matmuls_in_bf16_and_keeps_fp32_gradients():
    layer = _layer()
    x = torch.randn(3, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A.weight.grad.dtype == torch.float32
    plain = F.linear(x, layer.base_layer.weight, layer.base_layer.bias) + layer.scaling * (
        x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(y.float(), plain, rtol=2e-2, atol=5e-2)  # bf16 has 8 bits of mantissa


def test_dropout_applies_to_the_low_rank_path_only_in_training():
    layer = _layer(dropout=0.5)
    x = torch.randn(4, 12)
    lora = lambda h: layer.scaling * (h @ layer.lora_A.weight.T @ layer.lora_B.weight.T)  # noqa: E731
    base = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    layer.eval()
    torch.testing.assert_close(layer(x), base + lora(x))
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    torch.testing.assert_close(y, base + lora(F.dropout(x, 0.5, training=True)))
