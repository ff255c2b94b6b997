"""KV-cache generation: the cache changes nothing but speed; sampling filters equal transformers';
seeds reproduce; EOS stops rows."""

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import minitune
from minitune.generation import next_token, top_k_filter, top_p_filter
from minitune.model import ModelConfig, Transformer


def tiny(seed=0, **kw):
    """A small random model (config fields overridable by kw), weights scaled up so the next-token
    distribution is far from uniform; test_static_cache.py builds its models with it too."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2), **kw})
    m = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so the distribution is far from uniform
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


@pytest.fixture(scope="module")
def model():
    return tiny()


def prompt(n=7, seed=0):
    return torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def test_cached_greedy_equals_recomputing_the_whole_sequence(model):
    ids = prompt()
    got = minitune.generate(model, ids, max_new_tokens=20)
    seq = ids
    with torch.no_grad():
        for _ in range(20):  # no cache: the full forward each step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got.tolist() == seq.tolist()


@pytest.mark.parametrize("k", [1, 5, 200])
def test_top_k_filter_equals_transformers(k):
    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(k))
    assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(top_k=min(k, 97))(None, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_filter_equals_transformers(p):
    logits = 3 * torch.randn(4, 97, generator=torch.Generator().manual_seed(int(p * 1000)))
    assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(top_p=p)(None, logits.clone()))


def test_top_k_1_and_tiny_top_p_sample_the_argmax(model):
    ids = prompt()
    greedy = minitune.generate(model, ids, max_new_tokens=10)
    assert torch.equal(minitune.generate(model, ids, 10, temperature=1.5, top_k=1, seed=3), greedy)
    assert torch.equal(minitune.generate(model, ids, 10, temperature=1.5, top_p=1e-6, seed=3), greedy)


def test_same_seed_same_sample_different_seed_different(model):
    ids = prompt().repeat(4, 1)
    a = minitune.generate(model, ids, 24, temperature=1.0, seed=123)
    b = minitune.generate(model, ids, 24, temperature=1.0, seed=123)
    c = minitune.generate(model, ids, 24, temperature=1.0, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r) for r in a.tolist()}) > 1  # rows sample independently


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(next_token(logits, temperature=0.7, generator=g), minlength=4).float() / 20000
    assert torch.allclose(counts, (logits[0] / 0.7).softmax(-1), atol=0.01)


def test_eos_stops_each_row_and_pads_finished_rows_with_eos(model):
    ids = torch.cat([prompt(seed=1), prompt(seed=2)])
    free = minitune.generate(model, ids, max_new_tokens=12)[:, 7:].tolist()
    eos = free[0][3]  # a token row 0 emits by its 4th step

    def expected_row(row):  # the free continuation up to its first eos, then eos to the end
        stop = row.index(eos) + 1 if eos in row else len(row)
        return row[:stop] + [eos] * (len(row) - stop)

    out = minitune.generate(model, ids, max_new_tokens=12, eos_id=eos)[:, 7:].tolist()
    width = max(min(r.index(eos) + 1 if eos in r else 12, 12) for r in free)
    assert out == [expected_row(r)[:width] for r in free]
    single = minitune.generate(model, ids[:1], max_new_tokens=12, eos_id=[eos, 96])
    assert single.shape[1] == 7 + free[0].index(eos) + 1  # a lone row stops as soon as it is finished


def test_on_token_streams_every_new_column(model):
    seen = []
    out = minitune.generate(model, prompt(), 5, on_token=lambda t: seen.append(t.tolist()))
    assert [s[0] for s in seen] == out[0, 7:].tolist()


def test_generation_does_not_track_gradients(model):
    out = minitune.generate(model, prompt(), 3)
    assert not out.requires_grad and out.dtype == torch.long


def test_generate_leaves_the_weights_as_it_found_them():
    """The decode-time column-major layout (generation.matvec_layout) is undone afterwards, also
    when on_token stops generation with an exception, and the tokens match a plain layout's."""
    from minitune.generation import matvec_layout

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    minitune.generate(model, ids, 8)
    for n, p in model.named_parameters():
        assert p.is_contiguous() and torch.equal(p, before[n]), n

    def stop(tok):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        minitune.generate(model, ids, 8, on_token=stop)
    assert all(p.is_contiguous() for p in model.parameters())
    with matvec_layout(model):
        assert not model.lm_head.weight.is_contiguous()  # (tied: the embedding table too)
        assert torch.equal(model.lm_head.weight, before["model.embed_tokens.weight"])
