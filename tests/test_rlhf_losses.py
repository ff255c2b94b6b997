"""Reward-model, PPO and DPO losses against formulas written out independently here."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from minitune.rlhf import (
    DPO_LOSS_TYPES,
    AdaptiveKLController,
    FixedKLController,
    RewardModel,
    collapse_stats,
    collapse_warnings,
    dpo_loss,
    entropy_from_logits,
    gather_last,
    last_token_index,
    logprobs_from_logits,
    pairwise_loss,
    ppo_policy_loss,
    ppo_value_loss,
    repetition_rate,
    reward_accuracy,
    sequence_logps,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------- reward model


def test_pairwise_loss_without_margin_is_mean_neg_log_sigmoid_of_difference():
    chosen, rejected = [1.0, 0.2, -3.0], [0.5, 0.9, -1.0]
    expected = sum(-log_sigmoid(c - r) for c, r in zip(chosen, rejected)) / 3
    got = pairwise_loss(torch.tensor(chosen), torch.tensor(rejected))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_pairwise_loss_with_per_pair_margin():
    chosen, rejected, margin = [1.0, 0.2, -3.0], [0.5, 0.9, -1.0], [1.0, 0.0, 0.5]
    expected = sum(-log_sigmoid(c - r - m) for c, r, m in zip(chosen, rejected, margin)) / 3
    got = pairwise_loss(torch.tensor(chosen), torch.tensor(rejected), torch.tensor(margin))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_pairwise_loss_is_finite_for_huge_score_gaps():
    loss = pairwise_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert loss.item() == pytest.approx(400.0)


def test_reward_accuracy_counts_strict_wins():
    assert reward_accuracy(torch.tensor([1.0, 2.0, 0.0, 5.0]), torch.tensor([0.0, 3.0, 0.0, 1.0])) == 0.5


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="no real tokens"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_gather_last_reads_value_at_last_real_token():
    values = torch.arange(10.0).view(2, 5)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    assert gather_last(values, right).tolist() == [2.0, 6.0]
    assert gather_last(values.unsqueeze(-1), left).tolist() == [4.0, 9.0]


class ToyBackbone(nn.Module):
    """Stands in for the transformer: embedding only, with the interface RewardModel needs."""

    def __init__(self, vocab=11, hidden=8):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden)
        self.emb = nn.Embedding(vocab, hidden)

    def hidden_states(self, input_ids, attention_mask=None):
        return self.emb(input_ids)


def test_reward_model_scores_same_sequence_equally_under_left_and_right_padding():
    torch.manual_seed(0)
    rm = RewardModel(ToyBackbone())
    ids_r = torch.tensor([[3, 4, 5, 0, 0]])
    ids_l = torch.tensor([[0, 0, 3, 4, 5]])
    s_r = rm(ids_r, torch.tensor([[1, 1, 1, 0, 0]]))
    s_l = rm(ids_l, torch.tensor([[0, 0, 1, 1, 1]]))
    assert s_r.shape == (1,)
    torch.testing.assert_close(s_r, s_l)
    torch.testing.assert_close(s_r, rm.token_values(ids_r)[:, 2])


# ---------------------------------------------------------------- log-probs, entropy


def test_logprobs_from_logits_matches_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7)
    labels = torch.randint(0, 7, (3, 4))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)


def test_entropy_from_logits_matches_definition():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    uniform = torch.zeros(1, 1, 8)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(8))


# ---------------------------------------------------------------- PPO losses


def test_ppo_policy_loss_clipping_hand_computed():
    # ratios 1.5, 0.5, 1.1, 0.7 with clip 0.2; advantages +1, -1, +2, +1.
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    old = torch.zeros(1, 4)
    logp = ratio.log()
    mask = torch.ones(1, 4)
    loss, clip_frac, approx_kl = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    # token 0: A>0, ratio above 1.2 -> clipped: -1.2
    # token 1: A<0, ratio below 0.8 -> clipped: -(-1)*0.8 = 0.8
    # token 2: inside the range -> -2*1.1 = -2.2
    # token 3: A>0, ratio below 0.8 -> max(-0.7, -0.8) = -0.7, the unclipped (pessimistic) one
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2 - 0.7) / 4, rel=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 4)
    assert approx_kl.item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in [1.5, 0.5, 1.1, 0.7]) / 4, rel=1e-6)


def test_ppo_policy_loss_clipped_tokens_get_no_gradient_and_padding_is_ignored():
    logp = torch.tensor([[math.log(1.5), math.log(1.1), 5.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 100.0]])
    loss, _, _ = ppo_policy_loss(logp, torch.zeros(1, 3), adv, torch.tensor([[1, 1, 0]]), clip_range=0.2)
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0  # clipped
    assert logp.grad[0, 1].item() == pytest.approx(-1.1 / 2)  # d(-A*exp(l))/dl / n_real
    assert logp.grad[0, 2].item() == 0.0  # padding
    assert loss.item() == pytest.approx((-1.2 - 1.1) / 2)


def test_ppo_value_loss_clipping_hand_computed():
    old = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[1.0, 0.1, 1.5]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    loss, clip_frac = ppo_value_loss(values, old, returns, torch.ones(1, 3), clip_range_value=0.2)
    # token 0: clipped value 0.2; errors (1-2)^2=1, (0.2-2)^2=3.24 -> 3.24 (clipped wins)
    # token 1: inside the range -> (0.1-1)^2 = 0.81
    # token 2: clipped value 1.2; errors 2.25 vs 1.44 -> 2.25 (unclipped wins)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.81 + 2.25) / 3, rel=1e-6)
    assert clip_frac.item() == pytest.approx(1 / 3)


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_follows_ziegler_update():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9 -> error 0.5 clipped to 0.2 -> beta * (1 + 0.2 * 256/10000)
    assert ctl.update(9.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    # KL 5.4 -> error -0.1 (inside the clip)
    assert ctl.update(5.4, 100) == pytest.approx(0.2 * (1 - 0.1 * 100 / 10000))
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    # KL 0 -> error -1 clipped to -0.2
    ctl.update(0.0, 1000)
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 1000 / 10000))


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 512) == 0.05 and ctl.value == 0.05


# ---------------------------------------------------------------- collapse watch


def test_repetition_rate_counts_repeated_ngrams_over_real_tokens():
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2, 3], [1, 2, 3, 4, 5, 0, 0, 0, 0], [7, 7, 0, 0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1, 1] + [0] * 7])
    rates = repetition_rate(ids, mask, n=3)
    assert rates.tolist() == pytest.approx([4 / 7, 0.0, 0.0])


def test_collapse_warnings_fire_on_eos_only_responses():
    eos = 2
    ids = torch.tensor([[eos, 0, 0, 0]] * 4)
    mask = torch.tensor([[1, 0, 0, 0]] * 4)
    warnings = collapse_warnings(collapse_stats(ids, mask))
    assert len(warnings) == 1 and "EOS-only" in warnings[0]


def test_collapse_warnings_fire_on_looping_responses():
    ids = torch.tensor([[5, 6, 5, 6, 5, 6, 5, 6, 5, 6, 5, 6]] * 3)
    mask = torch.ones_like(ids)
    warnings = collapse_warnings(collapse_stats(ids, mask))
    assert len(warnings) == 1 and "loop" in warnings[0]


def test_collapse_warnings_silent_on_healthy_responses():
    ids = torch.tensor([[4, 9, 3, 8, 2, 0, 0], [5, 1, 7, 2, 0, 0, 0], [3, 3, 6, 1, 9, 4, 2]])
    mask = (ids != 0).long()
    assert collapse_warnings(collapse_stats(ids, mask)) == []
    assert collapse_warnings({}) == []


# ---------------------------------------------------------------- DPO


def dpo_reference(pc, pr, rc, rr, beta, eps, loss_type):
    """One example at a time, in floats."""
    m = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * m) - eps * log_sigmoid(-beta * m)
    if loss_type == "ipo":
        return (m - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * m)
    raise AssertionError(loss_type)


DPO_BATCH = dict(
    policy_chosen_logps=[-10.0, -3.0, -20.0, -7.5],
    policy_rejected_logps=[-12.0, -2.0, -19.0, -30.0],
    ref_chosen_logps=[-11.0, -3.5, -18.0, -8.0],
    ref_rejected_logps=[-11.5, -2.5, -21.0, -25.0],
)


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("sigmoid", 0.1, 0.1), ("sigmoid", 0.3, 0.25),
     ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0), ("hinge", 1.0, 0.0)],
)
def test_dpo_loss_matches_formula(loss_type, beta, eps):
    b = DPO_BATCH
    rows = list(zip(*b.values()))
    expected = sum(dpo_reference(*row, beta, eps, loss_type) for row in rows) / len(rows)
    loss, cr, rr = dpo_loss(*(torch.tensor(v) for v in b.values()), beta=beta, label_smoothing=eps, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert cr.tolist() == pytest.approx([beta * (p - r) for p, r in zip(b["policy_chosen_logps"], b["ref_chosen_logps"])])
    assert rr.tolist() == pytest.approx([beta * (p - r) for p, r in zip(b["policy_rejected_logps"], b["ref_rejected_logps"])])


def test_dpo_rewards_are_detached_and_loss_has_gradient():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, cr, rr = dpo_loss(pc, torch.tensor([-1.5, -1.0]), torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0]))
    assert not cr.requires_grad and not rr.requires_grad
    loss.backward()
    assert (pc.grad < 0).all()  # raising log pi(chosen) lowers the loss


def test_dpo_at_reference_sigmoid_loss_is_log2():
    z = torch.zeros(3)
    assert dpo_loss(z, z, z, z)[0].item() == pytest.approx(math.log(2))


def test_dpo_unknown_loss_type_lists_supported():
    z = torch.zeros(2)
    with pytest.raises(ValueError) as e:
        dpo_loss(z, z, z, z, loss_type="kto")
    for name in DPO_LOSS_TYPES:
        assert name in str(e.value)


def test_dpo_label_smoothing_rejected_outside_sigmoid_or_range():
    z = torch.zeros(2)
    with pytest.raises(ValueError):
        dpo_loss(z, z, z, z, label_smoothing=0.1, loss_type="ipo")
    with pytest.raises(ValueError):
        dpo_loss(z, z, z, z, label_smoothing=0.5)


def test_sequence_logps_counts_only_response_tokens_with_causal_shift():
    torch.manual_seed(0)
    V = 6
    logits = torch.randn(2, 5, V)
    input_ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]])
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 2, 3, -100, -100]])  # prompt and pad masked
    logp = torch.log_softmax(logits, -1)
    expected = [
        logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 5],  # logits at t predict the label at t+1
        logp[1, 0, 2] + logp[1, 1, 3],
    ]
    got = sequence_logps(logits, labels)
    assert got.tolist() == pytest.approx([e.item() for e in expected], rel=1e-6)
    # Changing logits at prompt-only positions (or the unused last position) changes nothing.
    logits2 = logits.clone()
    logits2[0, 0] += 10.0
    logits2[0, 4] += 10.0
    assert sequence_logps(logits2, labels)[0].item() == pytest.approx(got[0].item(), rel=1e-6)
