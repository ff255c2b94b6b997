"""Direct Preference Optimization: the loss, and sequence log-probs for it.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model") notes that the KL-regularised RLHF objective has a closed-form
optimum, pi*(y|x) ∝ pi_ref(y|x) exp(r(x,y) / beta), so the reward can be written through
the policy itself:  r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + const.
Put that into the Bradley-Terry preference model and the partition function cancels:

    m    = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]
    loss = -log sigmoid(beta * m)                                          "sigmoid"

No reward model, no sampling: a classification loss on preference pairs (y_w chosen,
y_l rejected).  Variants supported here (m is always the unscaled log-ratio margin):

  sigmoid + label_smoothing eps  (conservative DPO, Mitchell 2023, "A note on DPO with
      noisy preferences"): assume each label is flipped with probability eps,
      loss = -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)
  ipo    (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
      Human Preferences"): regress m onto a fixed target instead of pushing it to
      infinity, which DPO does on deterministic preferences:  (m - 1/(2 beta))^2
  hinge  (SLiC, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
      Feedback"):  relu(1 - beta m)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ppo import logprobs_from_logits

__all__ = ["dpo_loss", "sequence_logps", "DPO_LOSS_TYPES"]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, chosen_rewards, rejected_rewards).

    Inputs are [B] sequence log-probs (summed over response tokens, see sequence_logps).
    loss: scalar batch mean.  chosen_rewards / rejected_rewards: [B] implicit rewards
    beta * (log pi - log pi_ref), detached (for logging accuracy and margin only).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; supported: {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        # eps = 0.5 means "labels are coin flips": nothing left to learn.
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is defined for loss_type='sigmoid' only, not {loss_type!r}")

    # BEGIN EXERCISE 12.1: the DPO loss
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B] log pi/pi_ref on y_w
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B] ... on y_l
    margin = chosen_logratios - rejected_logratios  # [B] the unscaled m

    if loss_type == "sigmoid":
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * margin)
    # END EXERCISE

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum of log p(token) over response tokens: logits [B, T, V], labels [B, T] -> [B].

    Causal-LM alignment: logits at position t predict the token at t+1, so we pair
    logits[:, :-1] with labels[:, 1:].  Prompt and padding positions carry
    ``ignore_index`` in labels and contribute nothing: DPO compares the likelihood of the
    two *responses* given the same prompt.  A sum, not a mean: the log-probability of a
    sequence is the sum of its token log-probs.
    """
    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != ignore_index  # [B, T-1]
    safe_labels = labels.masked_fill(~mask, 0)  # any valid id; zeroed by the mask below
    token_logps = logprobs_from_logits(logits, safe_labels)  # [B, T-1]
    return (token_logps * mask).sum(dim=-1)
