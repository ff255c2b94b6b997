"""Bottleneck adapters (serial Houlsby, parallel He et al.): the base model exactly at init, the block
equation, only adapters trainable, parameter counts by formula, training and generation.
(PEFT has no bottleneck adapter, so these properties are the oracle.)"""

import pytest
import torch
import torch.nn.functional as F

import minitune
from minitune.model import ModelConfig, Transformer
from minitune.peft.adapter import Adapter, adapter_num_params, adapter_state_dict, apply_adapters, remove_adapters

CFG = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
IDS = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(0))
VARIANTS = [("serial", ("attn", "mlp")), ("parallel", ("attn", "mlp")), ("serial", "mlp"), ("parallel", ("attn",))]


def base_model():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    with torch.no_grad():  # larger weights than the init, so greedy text is not one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(model, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode,where", VARIANTS)
def test_identity_at_init_exactly(mode, where):
    model = base_model()
    with torch.no_grad():
        before = model(IDS)
        apply_adapters(model, bottleneck=8, mode=mode, where=where)
        assert torch.equal(model(IDS), before)


@pytest.mark.parametrize("mode,where", VARIANTS)
def test_only_adapters_trainable_and_count_by_formula(mode, where):
    model = apply_adapters(base_model(), bottleneck=8, mode=mode, where=where)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".adapter." in n for n in names)
    saved = adapter_state_dict(model)
    assert trainable(model) == adapter_num_params(CFG, 8, where) == sum(v.numel() for v in saved.values())
    # base names are untouched: a base state dict loads, missing only the adapters
    missing, unexpected = model.load_state_dict(base_model().state_dict(), strict=False)
    assert not unexpected and set(missing) == set(adapter_state_dict(model))


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_block_follows_the_adapter_equation(mode):
    model = apply_adapters(base_model(), bottleneck=8, mode=mode)
    block = model.model.layers[0]
    with torch.no_grad():
        for a in (block.self_attn.adapter, block.mlp.adapter):
            a.up.weight.normal_()
        x = torch.randn(1, 5, CFG.hidden_size)
        got = block.mlp(block.post_attention_layernorm(x))
        h = block.post_attention_layernorm(x)
        f = F.linear(F.silu(F.linear(h, block.mlp.gate_proj.weight)) * F.linear(h, block.mlp.up_proj.weight),
                     block.mlp.down_proj.weight)
        a = block.mlp.adapter
        want = f + a.up(torch.relu(a.down(f if mode == "serial" else h)))
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_training_changes_outputs_lowers_loss_and_leaves_the_base(mode):
    model = apply_adapters(base_model(), bottleneck=8, mode=mode)
    base_before = {k: v.clone() for k, v in model.state_dict().items() if ".adapter." not in k}
    with torch.no_grad():
        before = model(IDS)
    losses = train(model)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert not torch.allclose(model(IDS), before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base_before.items())
    up = model.model.layers[0].self_attn.adapter.up.weight
    assert up.abs().sum() > 0  # the zero-initialised up-projection has learned something


def test_generate_works_at_init_and_after_training():
    plain = minitune.generate(base_model(), IDS[:1], 12)
    model = apply_adapters(base_model(), bottleneck=8, mode="parallel")
    assert torch.equal(minitune.generate(model, IDS[:1], 12), plain)
    train(model, lr=5e-2)
    got = minitune.generate(model, IDS[:1], 12)
    seq = IDS[:1]
    with torch.no_grad():
        for _ in range(12):  # no cache: the full forward each step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


def test_remove_adapters_gives_the_base_back():
    model = base_model()
    with torch.no_grad():
        before = model(IDS)
    apply_adapters(model, bottleneck=8)
    train(model)
    remove_adapters(model)
    assert not any(isinstance(m, Adapter) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDS), before)


def test_7b_formula():
    llama7b = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, model_type="llama")
    assert adapter_num_params(llama7b, 64) == 32 * 2 * (2 * 4096 * 64 + 64 + 4096) == 33_820_672


@pytest.mark.parametrize("kw,match", [
    (dict(bottleneck=0), "bottleneck"), (dict(bottleneck=-4), "bottleneck"), (dict(bottleneck=2.0), "bottleneck"),
    (dict(mode="series"), "mode"), (dict(where=("attn", "ffn")), "where"), (dict(where=()), "where"),
    (dict(activation="swishy"), "activation"),
])
def test_bad_input_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        apply_adapters(base_model(), **kw)


def test_applying_twice_is_an_error():
    model = apply_adapters(base_model(), bottleneck=4)
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model, bottleneck=4)
