"""Linear4bit and quantize_model: the frozen 4-bit base of QLoRA."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minitune.quant.linear4bit import Linear4bit, quantize_model
from minitune.quant.nf4 import dequantize_nf4, quantize_nf4


def linear(in_f=96, out_f=40, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_f_linear_with_dequantized_weight(bias, double_quant):
    layer = Linear4bit.from_linear(linear(bias=bias), double_quant=double_quant)
    x = torch.randn(3, 5, 96)
    expected = F.linear(x, layer.dequantize(), layer.bias)
    assert torch.equal(layer(x), expected)


def test_bf16_compute_dtype_casts_input_and_returns_input_dtype():
    layer = Linear4bit.from_linear(linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 96)
    w = layer.dequantize(torch.bfloat16)
    expected = F.linear(x.bfloat16(), w, layer.bias.bfloat16()).float()
    out = layer(x)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_dequantize_gives_the_weight_back_in_its_dtype():
    lin = linear(dtype=torch.bfloat16)
    layer = Linear4bit.from_linear(lin, double_quant=True)
    w = layer.dequantize()
    assert w.dtype == torch.bfloat16 and w.shape == lin.weight.shape
    assert torch.equal(w, dequantize_nf4(quantize_nf4(lin.weight, 64, True)))
    assert layer.dequantize(torch.float32).dtype == torch.float32
    rel = (w.float() - lin.weight.float()).norm() / lin.weight.float().norm()
    assert rel < 0.12  # 4-bit: about 10% relative error


def test_output_stays_close_to_the_full_precision_layer():
    lin = linear(256, 64)
    x = torch.randn(8, 256)
    out = Linear4bit.from_linear(lin)(x)
    ref = lin(x)
    assert ((out - ref).norm() / ref.norm()).item() < 0.12


def test_backward_gives_input_gradient_and_no_weight_gradient():
    layer = Linear4bit.from_linear(linear())
    x = torch.randn(3, 5, 96, requires_grad=True)
    layer(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, layer.dequantize(), layer.bias).pow(2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    assert not layer.bias.requires_grad and layer.bias.grad is None
    assert all(not b.requires_grad for b in layer.buffers())


def test_autograd_saves_no_full_precision_weight():
    layer = Linear4bit.from_linear(linear(256, 128))
    x = torch.randn(2, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(x).sum()
    assert 128 * 256 not in saved  # the weight is dequantized again in backward


def test_layer_holds_packed_buffers_and_no_float_weight():
    layer = Linear4bit.from_linear(linear(), double_quant=True)
    params = dict(layer.named_parameters())
    assert list(params) == ["bias"]
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_packed.numel() == 96 * 40 // 2
    assert layer.weight_absmax.dtype == torch.uint8
    assert not hasattr(layer, "weight")
    assert layer.weight_nbytes() < 96 * 40  # well under 1 byte per weight (incl. the 8-bit map)


@pytest.mark.parametrize("double_quant", [False, True])
def test_casting_the_model_keeps_the_scales_in_float32(double_quant):
    layer = Linear4bit.from_linear(linear(), double_quant=double_quant)
    w = layer.dequantize(torch.float32)
    dtypes = {n: b.dtype for n, b in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert {n: b.dtype for n, b in layer.named_buffers()} == dtypes
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(torch.float32), w)


def test_state_dict_round_trip_reproduces_outputs():
    a = Linear4bit.from_linear(linear(seed=1))
    b = Linear4bit.from_linear(linear(seed=2))
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 96)
    assert torch.equal(a(x), b(x))


class Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=True), nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.mlp(self.norm(self.q_proj(x) + self.k_proj(x)))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=64, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def test_quantize_model_swaps_linears_but_not_embeddings_or_lm_head():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 7))
    ref = model(ids)
    out_model = quantize_model(model)
    assert out_model is model
    swapped = sorted(n for n, m in model.named_modules() if isinstance(m, Linear4bit))
    assert swapped == [f"layers.{i}.{n}" for i in (0, 1)
                       for n in ("k_proj", "mlp.0", "mlp.2", "q_proj")]
    assert type(model.lm_head) is nn.Linear and type(model.embed) is nn.Embedding
    out = model(ids)
    assert out.shape == ref.shape and ((out - ref).norm() / ref.norm()).item() < 0.15


def test_quantized_model_holds_no_float_linear_weight_and_is_frozen():
    model = quantize_model(TinyLM())
    float_2d = {n for n, p in model.named_parameters() if p.dim() == 2}
    assert float_2d == {"embed.weight", "lm_head.weight"}
    for m in model.modules():
        if isinstance(m, Linear4bit):
            assert all(not p.requires_grad for p in m.parameters())


def test_quantize_model_skip_names_and_tied_head():
    model = quantize_model(TinyLM(), skip=("lm_head", "mlp.2"))
    assert type(model.layers[0].mlp[2]) is nn.Linear and type(model.layers[1].mlp[2]) is nn.Linear
    assert isinstance(model.layers[0].mlp[0], Linear4bit)
    # A head tied to the embedding is left alone even when not skipped (quantizing would untie it).
    tied = quantize_model(TinyLM(tie=True), skip=())
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.embed.weight


def test_quantize_model_passes_blocksize_and_double_quant():
    model = quantize_model(TinyLM(), blocksize=128, double_quant=False)
    layer = model.layers[0].q_proj
    assert layer.blocksize == 128 and not layer.double_quant
    assert layer.weight_absmax.dtype == torch.float32


def test_bad_inputs_are_clear_errors():
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="2-D weight"):
        Linear4bit(quantize_nf4(torch.randn(64)))
    with pytest.raises(ValueError, match="bias shape"):
        Linear4bit(quantize_nf4(torch.randn(8, 64)), bias=torch.zeros(7))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_model(TinyLM(), blocksize=96)
