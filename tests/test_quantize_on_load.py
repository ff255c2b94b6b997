"""load_model(quantize="nf4") streams a sharded checkpoint into NF4: each linear weight is read from its
safetensors file alone, quantized where the model lives as soon as it arrives, and only its NF4 form is
kept. So the model never holds more than the finished NF4 model plus one 16-bit weight (a 7B model's
bf16 copy never exists on the device), and the bytes are those of quantizing after a full load."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from minitune.model import checkpoint
from minitune.quant import Linear4bit, quantize_model

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("random_checkpoint", ROOT / "bench" / "random_checkpoint.py")
random_checkpoint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(random_checkpoint)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Qwen2 shape (untied head), 3 blocks, one block per shard: 5 safetensors files, bf16."""
    return random_checkpoint.write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", layers=3,
                                                     layers_per_shard=1)


def held_bytes(model: nn.Module) -> int:
    """Bytes of the model's materialised parameters and buffers (a meta tensor holds none; a tied one counts once)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def linear_weights(model) -> dict[str, tuple]:
    return {n: tuple(m.weight_shape) for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def test_nf4_loading_never_holds_more_than_the_nf4_model_and_one_16_bit_weight(sharded, monkeypatch):
    seen = {"held": [], "read": [], "float_linears": []}
    quantize, read = checkpoint._quantize_linear, checkpoint.read_tensor

    def watching_quantize(model, key, *args):
        # called as each tensor lands: a just-arrived linear weight is still 16-bit here
        seen["held"].append(held_bytes(model))
        seen["float_linears"].append(sum(isinstance(m, nn.Linear) and not m.weight.is_meta
                                         for n, m in model.named_modules() if n != "lm_head"))
        return quantize(model, key, *args)

    def watching_read(f, info, data_start):
        t = read(f, info, data_start)
        seen["read"].append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(checkpoint, "_quantize_linear", watching_quantize)
    monkeypatch.setattr(checkpoint, "read_tensor", watching_read)
    model = checkpoint.load_model(sharded, "cpu", torch.bfloat16, quantize="nf4")

    shapes = linear_weights(model)
    assert len(shapes) == 7 * 3 and not isinstance(model.lm_head, Linear4bit)
    largest_weight = max(o * i for o, i in shapes.values()) * 2  # bytes of the largest linear weight in bf16
    final = held_bytes(model)
    bf16_model = sum(seen["read"])  # the whole checkpoint, as stored (bf16)
    assert max(seen["float_linears"]) == 1  # one 16-bit block weight at a time, quantized before the next
    assert max(seen["held"]) <= final + largest_weight
    assert final + largest_weight < 0.6 * bf16_model  # so the bf16 model was never there in full
    # each read is one tensor, never a shard: the largest read is the largest tensor (the embedding)
    assert max(seen["read"]) == model.model.embed_tokens.weight.numel() * 2
    # what stays: NF4 codes + double-quantised scales per block linear, bf16 for the rest
    nf4 = sum(m.weight_nbytes() + (m.bias.numel() * 2 if m.bias is not None else 0)
              for m in model.modules() if isinstance(m, Linear4bit))
    rest = sum(p.numel() * 2 for n, p in model.named_parameters() if ".self_attn." not in n and ".mlp." not in n)
    assert final == nf4 + rest


def test_streamed_nf4_bytes_equal_quantizing_the_full_model_after_loading(sharded):
    streamed = checkpoint.load_model(sharded, "cpu", torch.bfloat16, quantize="nf4")
    after = quantize_model(checkpoint.load_model(sharded, "cpu", torch.bfloat16))
    a, b = dict(streamed.named_buffers()), dict(after.named_buffers())
    assert a.keys() == b.keys() and any(k.endswith("weight_packed") for k in a)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for (n, p), (m, q) in zip(streamed.named_parameters(), after.named_parameters()):
        assert n == m and torch.equal(p, q), n
    assert not any(p.requires_grad for p in streamed.parameters())
