"""GRPO: group advantages, the loss with the k3 KL, and the arithmetic rule reward."""

import math
import statistics

import pytest
import torch

from minitune.rlhf import arithmetic_reward, group_advantages, grpo_loss


def test_group_advantages_normalise_within_each_group():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]  # two prompts, group of 4
    got = group_advantages(torch.tensor(rewards), group_size=4).tolist()
    expected = []
    for g in (rewards[:4], rewards[4:]):
        mean, std = statistics.mean(g), statistics.stdev(g)  # sample (unbiased) std
        expected += [(r - mean) / (std + 1e-4) for r in g]
    assert got == pytest.approx(expected, rel=1e-5)


def test_group_advantages_all_equal_group_gives_zero():
    got = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), group_size=3)
    assert got.abs().max().item() == 0.0


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), group_size=1)


def grpo_reference(logp, old_logp, ref_logp, adv, mask, eps, beta):
    """Per-sequence loop in floats: mean over a sequence's tokens, then over sequences."""
    seq_losses = []
    for lp_row, old_row, ref_row, a, m_row in zip(logp, old_logp, ref_logp, adv, mask):
        terms = []
        for lp, old, ref, m in zip(lp_row, old_row, ref_row, m_row):
            if not m:
                continue
            ratio = math.exp(lp - old)
            surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            kl = math.exp(ref - lp) - (ref - lp) - 1
            terms.append(-surrogate + beta * kl)
        seq_losses.append(sum(terms) / len(terms))
    return sum(seq_losses) / len(seq_losses)


def test_grpo_loss_matches_per_sequence_formula_with_sequence_level_mean():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old_logp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref_logp = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate([6, 2, 4, 1]):
        mask[i, :n] = True
    loss, mean_kl, clip_frac = grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_range=0.2, beta=0.04)
    expected = grpo_reference(logp.tolist(), old_logp.tolist(), ref_logp.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert mean_kl.item() >= 0 and 0 <= clip_frac.item() <= 1


def test_grpo_k3_kl_is_zero_at_reference_and_positive_elsewhere():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    zero_adv = torch.zeros(1)
    loss, kl, _ = grpo_loss(logp, logp, logp, zero_adv, mask, 0.2, beta=1.0)
    assert loss.item() == 0.0 and kl.item() == 0.0
    loss, kl, _ = grpo_loss(logp, logp, logp + 0.5, zero_adv, mask, 0.2, beta=1.0)
    assert kl.item() == pytest.approx(math.exp(0.5) - 0.5 - 1)
    assert loss.item() == pytest.approx(kl.item())


def test_grpo_long_and_short_responses_weigh_the_same():
    # Same per-token loss on a 1-token and a 5-token response: sequence-level mean = that value.
    logp = torch.zeros(2, 5)
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    adv = torch.tensor([1.0, 1.0])
    loss, _, _ = grpo_loss(logp, logp, logp, adv, mask, 0.2, beta=0.0)
    assert loss.item() == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "prompt,response,reward",
    [
        ("12+7=", "19", 1.0),
        ("12+7=", " 19<eos>", 1.0),
        ("12+7=", "19 is the answer, not 20", 1.0),
        ("12+7=", "20", 0.0),
        ("12+7=", "190", 0.0),
        ("12+7=", "I think 18 or 19", 0.0),
        ("12+7=", "nineteen", 0.0),
        ("12+7=", "", 0.0),
        ("7-12=", "-5", 1.0),
        ("7-12=", "5", 0.0),
        ("6*7=", "42", 1.0),
        ("Answer briefly. 3 + 4 =", " 7", 1.0),
    ],
)
def test_arithmetic_reward(prompt, response, reward):
    assert arithmetic_reward(prompt, response) == reward


def test_arithmetic_reward_rejects_prompt_without_problem():
    with pytest.raises(ValueError, match="no 'a\\+b=' style problem"):
        arithmetic_reward("hello", "19")
