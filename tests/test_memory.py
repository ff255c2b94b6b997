"""The memory estimator: exact parameter counts for every layout, the 7B figure, bytes per method."""

import pytest
import torch

from minitune.memory import count_parameters, estimate_memory, human_bytes, lora_parameters, parameter_counts
from minitune.model import ModelConfig, Transformer

BASE = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6)
LLAMA2_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, model_type="llama")


@pytest.mark.parametrize("kw", [
    dict(model_type="llama"),
    dict(model_type="llama", tie_word_embeddings=True),
    dict(model_type="llama", num_key_value_heads=2, qkv_bias=True, o_bias=True, mlp_bias=True),
    dict(model_type="qwen2", num_key_value_heads=3),  # q/k/v biases, GQA
    dict(model_type="qwen2", num_key_value_heads=1, tie_word_embeddings=True),
    dict(model_type="qwen3", num_key_value_heads=2, head_dim=16),  # QK-norm, head_dim != hidden/heads
])
def test_parameter_count_equals_the_model(kw):
    cfg = ModelConfig(**BASE, **kw)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert count_parameters(cfg) == model.num_parameters()
    assert estimate_memory(cfg).n_params == model.num_parameters()


def test_llama2_7b_has_6_74b_parameters():
    assert count_parameters(LLAMA2_7B) == 6_738_415_616
    # LoRA r=8 on all seven projections: the 20M figure of the LoRA tutorials
    assert lora_parameters(LLAMA2_7B, 8) == 19_988_480


def test_bytes_per_parameter():
    n = count_parameters(LLAMA2_7B)
    fp32 = estimate_memory(LLAMA2_7B, "full", torch.float32)
    assert (fp32.parameters, fp32.gradients, fp32.optimizer_states, fp32.master_weights) == (4 * n, 4 * n, 8 * n, 0)
    bf16 = estimate_memory(LLAMA2_7B, "full", "bfloat16")
    assert (bf16.parameters, bf16.gradients, bf16.optimizer_states, bf16.master_weights) == (2 * n, 2 * n, 8 * n, 4 * n)
    assert bf16.activations < fp32.activations  # 16-bit activations under autocast
    lora = estimate_memory(LLAMA2_7B, "lora", torch.bfloat16, lora_r=8)
    r = lora_parameters(LLAMA2_7B, 8)
    assert lora.gradients == 4 * r and lora.optimizer_states == 8 * r and lora.parameters == 2 * n + 4 * r
    qlora = estimate_memory(LLAMA2_7B, "qlora", torch.bfloat16, lora_r=8)
    assert 3.5e9 < qlora.parameters < 4.5e9  # ~0.52 bytes per block weight, embeddings/head in bf16
    assert qlora.total < lora.total < bf16.total
    bigger = estimate_memory(LLAMA2_7B, "full", torch.bfloat16, batch_size=4, seq_len=1024)
    assert bigger.activations == pytest.approx(8 * bf16.activations)  # linear in batch x length (default 1 x 512)
    with pytest.raises(ValueError, match="method"):
        estimate_memory(LLAMA2_7B, "prefix")


def test_table_states_the_rule_of_thumb():
    text = str(estimate_memory(LLAMA2_7B, "full", torch.bfloat16))
    assert "6.74B params = 27 GB in fp32, 13.5 GB in bf16" in text
    assert "AdamW moments" in text and "fp32 master weights" in text and "total" in text
    assert human_bytes(4e9) == "4 GB" and human_bytes(2e9) == "2 GB" and human_bytes(512) == "512 B"


def test_fused_loss_counts_one_chunk_of_logits_not_all_of_them():
    long = dict(batch_size=8, seq_len=4096)
    fused = estimate_memory(LLAMA2_7B, "lora", torch.bfloat16, **long)
    plain = estimate_memory(LLAMA2_7B, "lora", torch.bfloat16, fused_loss=False, **long)
    tokens, vocab, h = 8 * 4096, LLAMA2_7B.vocab_size, LLAMA2_7B.hidden_size
    # all logits and their gradient in fp32, versus two 4096-row chunks and the [tokens, h] input gradient
    assert plain.activations - fused.activations == 2 * tokens * vocab * 4 - (2 * 4096 * vocab * 4 + tokens * h * 4)
    short = dict(batch_size=1, seq_len=512)  # fewer tokens than a chunk: the logits exist whole either way
    assert (estimate_memory(LLAMA2_7B, **short).activations - estimate_memory(LLAMA2_7B, fused_loss=False, **short).activations
            == 512 * h * 4)


def test_fp32_weights_under_autocast_count_the_16_bit_copies_autograd_keeps():
    plain = estimate_memory(LLAMA2_7B, "lora", torch.float32, autocast=True)
    assert plain.weight_copies == 2 * parameter_counts(LLAMA2_7B)["linear"]
    full = estimate_memory(LLAMA2_7B, "full", torch.float32, autocast=True)
    assert full.weight_copies == plain.weight_copies + 2 * LLAMA2_7B.vocab_size * LLAMA2_7B.hidden_size
    assert estimate_memory(LLAMA2_7B, "lora", torch.bfloat16).weight_copies == 0  # 16-bit weights: no cast
    assert estimate_memory(LLAMA2_7B, "lora", torch.float32).weight_copies == 0  # no autocast
    assert "16-bit weight copies" in str(plain) and "16-bit weight copies" not in str(estimate_memory(LLAMA2_7B))
