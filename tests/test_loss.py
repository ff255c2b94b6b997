"""The fused, chunked LM head + cross-entropy (minitune.train.loss) against the plain
F.cross_entropy(lm_head(h)): same summed loss and gradients (fp32 rounding: rtol 1e-5) for any chunk
size, with masked rows, with nothing to learn, under bf16 autocast; and the trainer's
causal_lm_loss gives the same loss and gradients on either path."""

import pytest
import torch
import torch.nn.functional as F

import minitune.train.loss as loss_mod
from minitune.model import ModelConfig, Transformer
from minitune.peft import apply_lora
from minitune.peft.prompt import PromptTuningModel
from minitune.train.loss import IGNORE_INDEX, linear_cross_entropy
from minitune.train.trainer import causal_lm_loss

torch.set_num_threads(1)


def plain(h, w, labels):
    return F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def loss_and_grads(fn, h, w, labels, scale=0.37):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(h, w, labels)
    (loss * scale).backward()  # a non-unit incoming gradient, as the trainer's 1 / N gives
    return loss.detach(), h.grad, w.grad


def data(n=37, hidden=16, vocab=50, masked=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.3
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < masked] = IGNORE_INDEX
    return h, w, labels


@pytest.mark.parametrize("chunk", [1, 50 * 20, 50 * 37, 1 << 22])  # 16 rows (the hidden size), 20, exactly all, one chunk
@pytest.mark.parametrize("masked", [0.0, 0.4])
def test_same_loss_and_gradients_as_plain_cross_entropy(monkeypatch, chunk, masked):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", chunk)
    h, w, labels = data(masked=masked)
    got, want = loss_and_grads(linear_cross_entropy, h, w, labels), loss_and_grads(plain, h, w, labels)
    for g, x in zip(got, want):
        torch.testing.assert_close(g, x, rtol=1e-5, atol=1e-6)
    assert (got[1][labels == IGNORE_INDEX] == 0).all()  # masked rows get exactly no gradient


def test_no_labelled_rows_gives_zero_loss_and_zero_gradients():
    h, w, labels = data()
    loss, gh, gw = loss_and_grads(linear_cross_entropy, h, w, torch.full_like(labels, IGNORE_INDEX))
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_without_grad_only_the_loss_is_computed():
    h, w, labels = data()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, labels), plain(h, w, labels), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_is_close_to_the_plain_path():
    h, w, labels = data(n=64, hidden=32, vocab=80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = loss_and_grads(linear_cross_entropy, h, w, labels), loss_and_grads(plain, h, w, labels)
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)  # the same bf16 logits, fp32 softmax
    for g, x in zip(got[1:], want[1:]):  # gradients: bf16 products, rounded at different points
        torch.testing.assert_close(g, x, rtol=3e-2, atol=3e-3)


def tiny(method="full", tied=False):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    if method == "lora":
        return apply_lora(model, r=4, alpha=8, targets="all-linear")
    return PromptTuningModel(model, num_virtual_tokens=3) if method == "prompt" else model


class Wrapped(torch.nn.Module):
    """A model seen only through its forward, as under DDP: causal_lm_loss must take the plain path."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("method,tied", [("full", False), ("full", True), ("lora", True), ("prompt", False)])
def test_causal_lm_loss_fused_equals_plain_path(method, tied):  # full fine-tuning trains W too
    model = tiny(method, tied)
    ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # an SFT prompt
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask)
    results = []
    for m in (model, Wrapped(model)):
        model.zero_grad()
        loss, n = causal_lm_loss(m, batch)
        loss.backward()
        results.append((loss.detach(), n, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2 == 3 * 5  # positions 3..7 predict the labels at 4..8 in every row
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_log_softmax_in_place_changes_no_bit():
    # the chunk's logits are overwritten by their log-softmax to save memory: lesson figures must not move
    torch.manual_seed(0)
    h, w = torch.randn(50, 16, requires_grad=True), torch.randn(30, 16, requires_grad=True)
    labels = torch.randint(0, 30, (50,))
    total = linear_cross_entropy(h, w, labels)
    total.backward()
    logp = torch.log_softmax(h.detach() @ w.detach().t(), dim=-1)  # out of place
    dz = logp.exp().scatter_add(1, labels[:, None], torch.full((50, 1), -1.0))
    assert torch.equal(total.detach(), -logp.gather(1, labels[:, None]).sum())
    assert torch.equal(h.grad, dz @ w.detach()) and torch.equal(w.grad, dz.t() @ h.detach())
