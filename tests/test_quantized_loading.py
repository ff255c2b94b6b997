"""load_pretrained(quantize="nf4") quantizes while loading: same layers as quantize_model on a
loaded model, bit for bit, with the LM head and embeddings left alone."""

import pytest
import torch
from hf_factory import write_checkpoint

import minitune
from minitune.quant import Linear4bit, dequantize_model, quantize_model


@pytest.mark.parametrize("kind", ["qwen2", "llama2"])
def test_quantize_while_loading_equals_quantizing_after(tmp_path, kind):
    write_checkpoint(kind, tmp_path, dtype=torch.bfloat16)
    streamed, _ = minitune.load_pretrained(tmp_path, quantize="nf4")
    after = quantize_model(minitune.load_pretrained(tmp_path)[0])
    n_linear = sum(isinstance(m, Linear4bit) for m in streamed.modules())
    assert n_linear == 7 * streamed.config.num_hidden_layers  # q k v o gate up down; not lm_head
    assert not isinstance(streamed.lm_head, Linear4bit)
    assert not any(p.requires_grad for p in streamed.parameters())
    ids = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        assert torch.equal(streamed(ids), after(ids))
        full = minitune.load_pretrained(tmp_path)[0](ids).float().flatten()
        cos = torch.nn.functional.cosine_similarity(streamed(ids).float().flatten(), full, dim=0)
        assert cos > 0.9  # 4-bit weights: close to, not equal to, the bf16 model


def test_quantized_model_refuses_to_save_until_dequantized(tmp_path):
    write_checkpoint("qwen2", tmp_path / "src")
    model, _ = minitune.load_pretrained(tmp_path / "src", quantize="nf4")
    with pytest.raises(ValueError, match="4-bit layers"):
        minitune.save_pretrained(model, None, tmp_path / "out")
    minitune.save_pretrained(dequantize_model(model), None, tmp_path / "out")
    again, _ = minitune.load_pretrained(tmp_path / "out")
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_unknown_quantization_is_an_error(tmp_path):
    write_checkpoint("qwen2", tmp_path)
    with pytest.raises(ValueError, match="only None or 'nf4'"):
        minitune.load_pretrained(tmp_path, quantize="int3")
