"""QLoRA: LoRA trained with the SFT trainer on a model loaded straight into NF4. The loss falls,
the 4-bit base stays packed, bit for bit, and frozen; merging dequantizes to a plain checkpoint
that transformers loads with the same logits; bad state dicts are clear errors."""

import pytest
import torch
from hf_factory import rel_error, write_checkpoint

import minitune
from minitune.peft import apply_lora, load_adapter, merge_lora, save_adapter
from minitune.peft.qlora import QLoRALinear, load_qlora, merge_and_dequantize
from minitune.quant import Linear4bit
from minitune.train import TrainConfig, train

torch.set_num_threads(1)  # the tests share 2 cores; tiny models gain nothing from threads
VOCAB = 320  # hf_factory's vocabulary


def toy_data(n=16, length=12, seed=1) -> list[dict]:
    """Random sequences to memorise; the first two tokens are the (masked) prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def base_buffers(model) -> dict[str, torch.Tensor]:
    """Copies of every tensor of every 4-bit layer (packed codes, scales, biases)."""
    return {f"{n}.{k}": v.detach().clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)
            for k, v in list(m.named_buffers(recurse=False)) + list(m.named_parameters(recurse=False))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint folder, QLoRA model after training, base tensors before training, train result)."""
    path = tmp_path_factory.mktemp("qwen2")
    write_checkpoint("qwen2", path)
    model, _ = load_qlora(path, r=8, alpha=16, targets="all-linear", dtype=torch.float32)
    before = base_buffers(model)
    cfg = TrainConfig(finetuning_type="lora", learning_rate=1e-2, max_steps=12, per_device_train_batch_size=8,
                      logging_steps=1, save_steps=0, device="cpu", seed=0, lr_scheduler_type="constant")
    result = train(model, toy_data(), cfg)
    return path, model.eval(), before, result


def test_lora_wraps_every_4bit_linear_and_only_adapters_train(trained):
    _, model, _, _ = trained
    wrapped = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    assert len(wrapped) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    assert all(isinstance(m.base_layer, Linear4bit) for m in wrapped)
    assert not isinstance(model.lm_head, (Linear4bit, QLoRALinear))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    assert all(m.lora_A.weight.dtype == torch.float32 for m in wrapped)


def test_training_lowers_the_loss(trained):
    _, _, _, result = trained
    losses = list(result.losses.values())
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_base_stays_packed_frozen_and_bit_identical(trained):
    _, model, before, _ = trained
    after = base_buffers(model)
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t) and after[name].dtype == t.dtype, name
    packed = [m.weight_packed for m in model.modules() if isinstance(m, Linear4bit)]
    assert packed and all(p.dtype == torch.uint8 for p in packed)
    # no float copy of a base weight anywhere: the only nn.Linear left are the adapters and the head
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(n.endswith((".lora_A", ".lora_B")) or n == "lm_head" for n in linears), linears
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, Linear4bit) for p in m.parameters())
    # the adapters did move: B left its zero init
    assert all(m.lora_B.weight.abs().max() > 0 for m in model.modules() if isinstance(m, QLoRALinear))


def test_backward_reaches_only_the_adapters(trained):
    path, _, _, _ = trained
    model, _ = load_qlora(path, r=4, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 10))
    model(ids).float().logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n
    assert all(b.grad is None for b in model.buffers())


def test_merge_lora_on_a_4bit_base_points_to_merge_and_dequantize(trained):
    _, model, _, _ = trained
    with pytest.raises(ValueError, match="merge_and_dequantize"):
        merge_lora(model)


def test_merged_checkpoint_loads_in_transformers_with_the_same_logits(trained, tmp_path):
    import copy

    import transformers

    _, model, _, _ = trained
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        qlora_logits = model(ids)
        merged = merge_and_dequantize(copy.deepcopy(model), torch.float32)
        assert not any(isinstance(m, (Linear4bit, QLoRALinear)) for m in merged.modules())
        ours = merged(ids)
        # (dequant(W0) + s B A) x equals dequant(W0) x + s B (A x) up to float32 rounding
        assert rel_error(ours, qlora_logits) < 1e-5
        minitune.save_pretrained(merged, None, tmp_path / "merged")
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        assert rel_error(ref(ids).logits, ours) < 1e-5


def test_bf16_merge_saves_a_bf16_checkpoint_transformers_reads_bit_for_bit(trained, tmp_path):
    import copy

    import transformers

    _, model, _, _ = trained
    merged = merge_and_dequantize(copy.deepcopy(model), torch.bfloat16)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    minitune.save_pretrained(merged, None, tmp_path / "merged")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    theirs = ref.state_dict()
    for k, v in merged.state_dict().items():
        assert torch.equal(theirs[k], v), k
    # the merged weight is dequant(W0) + s B A computed in float32, rounded once to bf16
    q = model.model.layers[0].self_attn.q_proj
    want = (q.base_layer.dequantize(torch.float32) + q.delta_weight()).to(torch.bfloat16)
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, want)


def test_adapter_saved_from_qlora_reloads_onto_a_fresh_4bit_model(trained, tmp_path):
    path, model, _, _ = trained
    save_adapter(model, tmp_path / "adapter")
    fresh, _ = minitune.load_pretrained(path, dtype=torch.float32, quantize="nf4")
    load_adapter(fresh, tmp_path / "adapter")
    assert all(isinstance(m, QLoRALinear) for n, m in fresh.named_modules() if n.endswith("q_proj"))
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_apply_lora_with_named_targets_on_a_quantized_model(trained):
    path, _, _, _ = trained
    model, _ = minitune.load_pretrained(path, dtype=torch.float32, quantize="nf4")
    apply_lora(model, r=2, targets=["q_proj", "v_proj"])
    kinds = {n.split(".")[-1]: type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}
    assert kinds["q_proj"] == kinds["v_proj"] == "QLoRALinear" and kinds["o_proj"] == "Linear4bit"
    with torch.no_grad():  # B = 0: the adapted model starts exactly at the 4-bit base
        base, _ = minitune.load_pretrained(path, dtype=torch.float32, quantize="nf4")
        ids = torch.randint(0, VOCAB, (1, 9))
        assert torch.equal(model(ids), base(ids))


def test_shape_mismatch_in_a_4bit_state_dict_is_a_clear_error(tmp_path):
    write_checkpoint("qwen2", tmp_path / "a")
    write_checkpoint("llama2", tmp_path / "b")  # 4 kv heads instead of 2: k_proj/v_proj are twice as large
    a, _ = minitune.load_pretrained(tmp_path / "a", quantize="nf4")
    b, _ = minitune.load_pretrained(tmp_path / "b", quantize="nf4")
    k_a, k_b = a.model.layers[0].self_attn.k_proj, b.model.layers[0].self_attn.k_proj
    with pytest.raises(ValueError, match=r"weight_packed.*4-bit state dict holds shape \(2048,\).*out_features=32"):
        k_a.load_state_dict({k: v for k, v in k_b.state_dict().items() if k != "bias"} | {"bias": k_a.bias})
    with pytest.raises(ValueError, match="quantized from a different weight shape or block size"):
        a.model.layers[0].self_attn.load_state_dict(b.model.layers[0].self_attn.state_dict(), strict=False)
    # a 16-bit weight offered to a 4-bit layer
    with pytest.raises(ValueError, match=r"16-bit weight .* cannot load into a 4-bit layer.*quantize='nf4'"):
        k_a.load_state_dict({"weight": torch.zeros(32, 64), "bias": torch.zeros(32)})
    # and a checkpoint whose tensors do not fit its config, loaded into 4 bits
    import json

    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"_proj.weight has shape \(\d+, \d+\), but the model built from config.json expects"):
        minitune.load_pretrained(tmp_path / "a", quantize="nf4")


def test_merge_and_dequantize_rejects_a_non_float_dtype(trained):
    with pytest.raises(TypeError, match="dtype"):
        merge_and_dequantize(torch.nn.Linear(2, 2), torch.int8)


def test_ex_09_2_qlora_forward_is_base_plus_scaled_low_rank():
    """Exercise 09.2: y = base_layer(x) + (alpha / r) x A^T B^T, dropout on the low-rank path only."""
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(64, 48, bias=True))
    layer = QLoRALinear(base, r=4, alpha=8, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)  # B = 0 at init would hide the low-rank path
    x = torch.randn(2, 5, 64)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    layer.eval()
    want = base(x) + 2.0 * (x @ a.T @ b.T)
    assert layer(x).shape == (2, 5, 48)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer.train()  # dropout hits x on the way into A, never the base path
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(got, base(x) + 2.0 * (dropped @ a.T @ b.T), rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert a.grad is not None and b.grad is not None and base.weight_packed.grad is None
