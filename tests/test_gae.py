"""GAE, KL-penalised rewards and whitening, checked against plain Python written here."""

import math

import pytest
import torch

from minitune.rlhf import compute_gae, kl_penalty_rewards, masked_mean, masked_var, masked_whiten


def gae_one_sequence(rewards, values, gamma, lam):
    """Textbook GAE on one unpadded list of floats; the state after the end has value 0."""
    n = len(rewards)
    adv = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values)]


def right_padded_batch(lengths, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    values = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_per_sequence_loop_for_masks_of_different_lengths(gamma, lam):
    lengths = [6, 3, 1, 5]
    rewards, values, mask = right_padded_batch(lengths, T=6)
    # Garbage in the padding must not leak into real positions.
    rewards[~mask] = 1e3
    values[~mask] = -1e3
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        exp_adv, exp_ret = gae_one_sequence(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(exp_adv, abs=1e-12)
        assert ret[i, :n].tolist() == pytest.approx(exp_ret, abs=1e-12)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


def test_gae_five_token_example_by_hand():
    # The lesson's example: reward only at the end, gamma = lam = 1 -> A_t = R - V_t.
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.6, 0.7, 0.8]])
    mask = torch.ones(1, 5)
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.6, 0.4, 0.3, 0.2])
    assert ret[0].tolist() == pytest.approx([1.0] * 5)
    # lam = 0: one-step TD errors r_t + V_{t+1} - V_t, the last with V_after = 0.
    adv0, _ = compute_gae(rewards, values, mask, gamma=1.0, lam=0.0)
    assert adv0[0].tolist() == pytest.approx([-0.1, 0.2, 0.1, 0.1, 0.2])


def test_returns_are_advantages_plus_values_on_real_tokens():
    rewards, values, mask = right_padded_batch([4, 2], T=4, seed=1)
    adv, ret = compute_gae(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(ret[mask], (adv + values)[mask])


def test_kl_penalty_rewards_puts_score_on_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.7, 0.0, 0.0]])
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-0.1, -0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    scores = torch.tensor([2.0, -1.0])
    r = kl_penalty_rewards(logp, ref_logp, scores, mask, kl_coef=0.1)
    expected = torch.tensor([
        [-0.1 * 0.5, -0.1 * -1.0, 0.0 + 2.0, 0.0],
        [-0.1 * -0.2, -0.1 * -0.5 - 1.0, 0.0, 0.0],
    ])
    torch.testing.assert_close(r, expected)


def test_kl_penalty_rewards_rejects_empty_response():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="no real tokens"):
        kl_penalty_rewards(z, z, torch.zeros(2), torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)


def test_masked_mean_and_unbiased_var_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, -50.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    real = [1.0, 2.0, 3.0, 4.0]
    mean = sum(real) / 4
    var = sum((v - mean) ** 2 for v in real) / 3  # Bessel: n - 1
    assert masked_mean(x, mask).item() == pytest.approx(mean)
    assert masked_var(x, mask).item() == pytest.approx(var)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(var * 3 / 4)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 4.0])


def test_masked_whiten_gives_zero_mean_unit_unbiased_std_on_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, -50.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    w = masked_whiten(x, mask)
    real = [1.0, 2.0, 3.0, 4.0]
    mean = sum(real) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in real) / 3)
    assert w[mask.bool()].tolist() == pytest.approx([(v - mean) / std for v in real], rel=1e-6)
    assert w[~mask.bool()].abs().sum() == 0
    # shift_mean=False keeps the mean: only the scale changes.
    w2 = masked_whiten(x, mask, shift_mean=False)
    assert w2[mask.bool()].tolist() == pytest.approx([(v - mean) / std + mean for v in real], rel=1e-6)


def test_masked_var_needs_two_real_tokens():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(torch.ones(1, 3), torch.tensor([[1, 0, 0]]))
