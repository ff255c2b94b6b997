"""LoRAFunction's hand-written backward against autograd on the textbook formula
y = x W0^T + b + s (x A^T) B^T, the paths LoRALinear takes around it (autocast, dropout), and its one
switch: LoRALinear(fast=False) (the equation of exercise 06.1) and fast=True (LoRAFunction, what
apply_lora sets) give the same outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F

from minitune.peft import LoRALinear, apply_lora
from minitune.peft.lora import LoRAFunction, lora_layers

torch.set_num_threads(1)


def _layer(bias=True, in_f=12, out_f=10, r=4, alpha=8.0, dropout=0.0, fast=True):
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(in_f, out_f, bias=bias), r, alpha, dropout, fast=fast)
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


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("base_trainable", [False, True])
def test_fast_and_plain_give_the_same_outputs_and_gradients(bias, base_trainable, monkeypatch):
    """fp32, tolerance 1e-6 (rtol and atol): the two differ only in summation order and in where s multiplies."""
    fast, plain = _layer(bias, fast=True), _layer(bias, fast=False)
    plain.load_state_dict(fast.state_dict())
    calls, apply = [], LoRAFunction.apply
    monkeypatch.setattr(LoRAFunction, "apply", staticmethod(lambda *a: calls.append(1) or apply(*a)))
    runs = []
    for layer in (fast, plain):
        layer.base_layer.requires_grad_(base_trainable)
        x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(4), requires_grad=True)
        runs.append(_grads(lambda: layer(x), [x] + [p for p in layer.parameters() if p.requires_grad]))
    assert len(calls) == 1  # only the fast layer went through LoRAFunction
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-6, atol=1e-6)
    assert len(runs[0][1]) == len(runs[1][1])
    for g, w in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_the_switch_defaults_textbook_in_the_class_and_fast_in_apply_lora():
    assert LoRALinear.fast is False and LoRALinear(torch.nn.Linear(4, 3), 2, 4).fast is False
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    apply_lora(model, r=2, targets=["0", "1"])
    assert all(m.fast for m in lora_layers(model).values())
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    apply_lora(model, r=2, targets=["0"], fast=False)
    assert not any(m.fast for m in lora_layers(model).values())


def test_fast_steps_aside_for_merge_dropout_and_autocast():
    layer = _layer(dropout=0.5)
    x = torch.randn(3, 12)
    assert layer.fast and not layer.fast_applies(x)  # training with dropout: the equation
    layer.eval()
    assert layer.fast_applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.fast_applies(x)
