"""Each speed switch beside its plain path gives the same numbers:

  * Attention.fused_rope (default True): RoPE on [q; k] at once vs q and k each. Logits bit for bit
    (torch.equal) in fp32 and bf16, and both equal transformers' logits bit for bit (RoPE is
    elementwise per head; concatenating along the head axis changes no arithmetic). Gradients bit for
    bit too, except the QK-norm weights' (Qwen3), a sum over heads that backward takes in another
    memory order: max error / max value < 1e-5 (seen: 1.5e-7).
  * generate(fast_decode=...) (default True): the matvec weight layout vs the plain loop. Same tokens
    (greedy and seeded sampling), and the logits of the last step agree to fp32 rounding (rtol 1e-5:
    BLAS may sum a transposed product in another order).
  * causal_lm_loss(fused=...) (default True): chunked LM head + cross-entropy vs lm_head +
    F.cross_entropy. Loss rtol 1e-5 / atol 1e-6, gradients rtol 1e-4 / atol 1e-6 (fp32 sums in another order).
"""

import pytest
import torch
from hf_factory import KINDS, hf_load, write_checkpoint

import minitune
from minitune.generation import decode_loop, generate
from minitune.model import ModelConfig, Transformer
from minitune.model.transformer import Attention
from minitune.train.loss import IGNORE_INDEX, causal_lm_loss

torch.set_num_threads(1)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2), **kw})
    m = Transformer(cfg)
    with torch.no_grad():  # larger weights than the init, so the distribution is far from uniform
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


@pytest.fixture
def rope_mode(monkeypatch):
    def set_mode(fused: bool):
        monkeypatch.setattr(Attention, "fused_rope", fused)
    return set_mode


def test_fused_rope_is_the_default():
    assert Attention.fused_rope is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_rope_equals_plain_rope_bit_for_bit(rope_mode, dtype, qk_norm):
    model = tiny(qk_norm=qk_norm).to(dtype)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the explicit-mask path too
    results = []
    for fused in (False, True):
        rope_mode(fused)
        model.zero_grad()
        out = model(ids, attention_mask=mask)
        out.float().square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b)
    for name in ga:
        if "q_norm" in name or "k_norm" in name:
            assert ((gb[name] - ga[name]).abs().max() / ga[name].abs().max()).item() < 1e-5, name
        else:
            assert torch.equal(gb[name], ga[name]), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_rope_paths_equal_transformers_bit_for_bit(tmp_path, rope_mode, kind, dtype):
    write_checkpoint(kind, tmp_path, dtype=dtype)
    ours, _ = minitune.load_pretrained(tmp_path)
    ref = hf_load(tmp_path)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        for fused in (False, True):
            rope_mode(fused)
            assert torch.equal(ours(ids), expected), f"fused_rope={fused}"


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_k=20, top_p=0.9, seed=5)])
def test_fast_decode_gives_the_same_tokens_as_the_plain_loop(sampling):
    model = tiny().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    plain = generate(model, ids, 24, attention_mask=mask, fast_decode=False, **sampling)
    fast = generate(model, ids, 24, attention_mask=mask, **sampling)  # the default: fast_decode=True
    assert plain.tolist() == fast.tolist()


def test_fast_decode_logits_match_the_plain_loop():
    model = tiny().eval()
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    seen = {}
    for fast in (False, True):
        steps = []
        head = model.lm_head
        orig = head.forward
        head.forward = lambda x, orig=orig, steps=steps: steps.append(orig(x)) or steps[-1]
        try:
            generate(model, ids, 6, fast_decode=fast)
        finally:
            del head.forward
        seen[fast] = torch.stack([s.float() for s in steps])
    torch.testing.assert_close(seen[True], seen[False], rtol=1e-5, atol=1e-6)
    assert decode_loop is not None  # the plain loop is public: generate(fast_decode=False) runs only it


@pytest.mark.parametrize("tied", [False, True])
def test_fused_loss_equals_plain_loss_and_gradients(tied):
    model = tiny(tie_word_embeddings=tied)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 / 8)
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # an SFT prompt
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask)
    results = {}
    for fused in (False, True):
        model.zero_grad()
        loss, n = causal_lm_loss(model, batch, fused=fused)
        loss.backward()
        results[fused] = (loss.detach(), n, [p.grad.clone() for p in model.parameters()])
    (l0, n0, g0), (l1, n1, g1) = results[False], results[True]
    assert n0 == n1 == 3 * 5
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
