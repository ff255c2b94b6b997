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
      infinity, which DPO does on deterministic preferences:  (m - 1/(2 beta))^2.
      Here m is made of log-probs AVERAGED over each response's tokens (sum / length), not
      summed: a summed m grows with the reply's length, so the fixed target 1/(2 beta) would
      mean something different for every length. TRL's DPOTrainer (loss_type "ipo", confirmed
      with the IPO authors) and LLaMA-Factory (pref_loss: ipo) both average; so does
      dpo_loss_fn here. sigmoid and hinge use the summed log-probs, as the DPO paper.
  hinge  (SLiC, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
      Feedback"):  relu(1 - beta m)
  pref_ftx (LLaMA-Factory): any of them plus pref_ftx * (-mean log p(y_w)), an SFT term on
      the chosen reply with its log-prob averaged per token (sft_term below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX
from ..generation import generate
from ..peft.lora import disable_lora, lora_layers
from ..train import train
from .logprobs import logprobs_from_logits
from .pairs import PairCollator, PairData, stack_pairs

__all__ = ["dpo_loss", "sequence_logps", "DPO_LOSS_TYPES", "policy_logps", "pair_lengths", "sft_term", "dpo_loss_fn",
           "add_reference_logps", "train_dpo", "response_kl"]

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

    Inputs are [B] sequence log-probs (summed over response tokens, see sequence_logps; for ipo,
    dpo_loss_fn passes them divided by the response lengths: see the module docstring).
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


# ---------------------------------------------------------------------------
# The training loop: minitune.train with a DPO loss_fn
# ---------------------------------------------------------------------------


def policy_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(chosen | prompt), log pi(rejected | prompt): [B] each, one forward over the 2B rows."""
    ids, mask, labels = stack_pairs(batch)  # [2B, T]
    logps = sequence_logps(model(ids, attention_mask=mask), labels)  # [2B]
    return logps.chunk(2)


def pair_lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Response tokens scored on each side: [B] chosen, [B] rejected (what a log-prob average divides by)."""
    chosen = (batch["chosen_labels"][:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
    rejected = (batch["rejected_labels"][:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
    return chosen.float(), rejected.float()


def sft_term(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """LLaMA-Factory's pref_ftx term: -log p(y_w) averaged per token, then over the batch (a scalar)."""
    return -(chosen_logps / chosen_lengths).mean()


def dpo_loss_fn(beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, ftx: float = 0.0):
    """A loss_fn for minitune.train: DPO on one batch of pairs, counted in pairs.

    ipo: the four log-probs are divided by their response lengths first (see the module docstring).
    ftx > 0 adds ftx * sft_term (LLaMA-Factory's pref_ftx).

    The reference log-probs come from the batch ("ref_chosen_logps", "ref_rejected_logps", see
    add_reference_logps) or, when absent, from the same model with its LoRA adapters switched off.
    Returns TRL's metric names, which the trainer writes into its log: the implicit rewards
    beta * log(pi / pi_ref) of each side, their accuracy (chosen > rejected) and margin.
    """
    def loss_fn(model, batch: dict):
        # BEGIN EXERCISE 12.2: the DPO loss_fn (policy log-probs, reference, rewards)
        chosen, rejected = policy_logps(model, batch)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            if not lora_layers(model):
                raise ValueError("no reference log-probs in the batch and no LoRA adapters to switch off; "
                                 "run add_reference_logps on the data first")
            with torch.no_grad(), disable_lora(model):
                ref_chosen, ref_rejected = policy_logps(model, batch)
        loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                          beta, label_smoothing, loss_type)
        n_chosen, n_rejected = pair_lengths(batch)
        if loss_type == "ipo":  # the margin per response token, as TRL and LLaMA-Factory compute IPO
            loss, _, _ = dpo_loss(chosen / n_chosen, rejected / n_rejected, ref_chosen / n_chosen,
                                  ref_rejected / n_rejected, beta, label_smoothing, loss_type)
        if ftx > 0:
            loss = loss + ftx * sft_term(chosen, n_chosen)
        metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                   "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                   "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                   "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}
        return loss, chosen.shape[0], metrics
        # END EXERCISE

    return loss_fn


@torch.no_grad()
def add_reference_logps(model, features: list[dict], tokenizer, batch_size: int = 32) -> list[dict]:
    """Copies of `features` with "ref_chosen_logps" / "ref_rejected_logps" of the reference policy.

    The reference is `model` as it is now (call before training: DPO's pi_ref is the SFT model),
    with LoRA adapters switched off if it has any. Computed once, so training needs no second model
    in memory and no second forward pass per step. Runs on the model's current device.
    """
    return add_reference_columns(model, features, PairCollator(tokenizer), policy_logps,
                                 ("ref_chosen_logps", "ref_rejected_logps"), batch_size)


@torch.no_grad()
def add_reference_columns(model, features: list[dict], collate, score, names: tuple[str, ...],
                          batch_size: int = 32) -> list[dict]:
    """Copies of `features` with columns `names` set to score(model, batch), one [B] tensor per name, of
    `model` as it is now with its LoRA adapters switched off: the reference, computed once before
    training (DPO here, KTO in kto.py)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    with disable_lora(model):
        for i in range(0, len(features), batch_size):
            part = features[i:i + batch_size]
            batch = {k: v.to(device) for k, v in collate(part).items()}
            columns = [values.tolist() for values in score(model, batch)]
            out += [{**f, **{name: float(col[j]) for name, col in zip(names, columns)}} for j, f in enumerate(part)]
    model.train(was_training)
    return out


def train_dpo(model, data: PairData, cfg, tokenizer, beta: float | None = None, loss_type: str | None = None,
              label_smoothing: float | None = None, reference=None):
    """DPO with minitune.train: reference log-probs first, then the policy trains on data.train.

    beta, loss_type, label_smoothing default to cfg.pref_beta, cfg.pref_loss, cfg.dpo_label_smoothing
    (LLaMA-Factory's names); cfg.pref_ftx adds the SFT term. reference: a separate reference model
    (LLaMA-Factory's ref_model); None: `model` as it is now. Returns the TrainResult;
    result.metrics[step] holds the logged rewards.
    """
    beta = cfg.pref_beta if beta is None else beta
    loss_type = cfg.pref_loss if loss_type is None else loss_type
    label_smoothing = cfg.dpo_label_smoothing if label_smoothing is None else label_smoothing
    dpo_loss(*torch.zeros(4, 1), beta, label_smoothing, loss_type)  # bad settings fail now, not at step 1
    reference = model if reference is None else reference
    train_data = add_reference_logps(reference, data.train, tokenizer)
    val_data = add_reference_logps(reference, data.val, tokenizer) if data.val else None
    return train(model, train_data, cfg, val_data=val_data, collate=PairCollator(tokenizer),
                 loss_fn=dpo_loss_fn(beta, loss_type, label_smoothing, cfg.pref_ftx),
                 tokenizer=tokenizer)


# ---------------------------------------------------------------------------
# How far did the policy move? KL to the reference on its own samples
# ---------------------------------------------------------------------------


@torch.no_grad()
def response_kl(policy, reference, prompts: list[list[int]], stop_ids: list[int], pad_id: int,
                max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0, batch_size: int = 32) -> dict:
    """KL(pi || pi_ref) estimated on responses sampled from the policy.

    KL = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)], so the mean over sampled tokens of the log-ratio
    is an unbiased per-token estimate (Schulman's k1). reference=None: the policy with LoRA off.
    Returns {"kl_per_token", "kl_per_sequence", "tokens", "mean_length"}; a response ends with
    (and includes) its first stop token.
    """
    policy.eval()
    device = next(policy.parameters()).device
    ratio_sum, n_tokens, seq_kls = 0.0, 0, []
    for i in range(0, len(prompts), batch_size):
        rows = prompts[i:i + batch_size]
        n = max(map(len, rows))
        ids = torch.tensor([[pad_id] * (n - len(r)) + r for r in rows], device=device)  # left padding
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], device=device)
        out = generate(policy, ids, max_new_tokens, temperature, eos_id=stop_ids, attention_mask=mask, seed=seed + i)
        new = out[:, n:]  # [b, N]
        is_stop = torch.isin(new, torch.tensor(stop_ids, device=device))
        # real response tokens: everything up to and including the first stop (generate pads with stops after it)
        resp = (is_stop.long().cumsum(-1) - is_stop.long()) == 0  # [b, N]
        full_mask = torch.cat([mask, resp.long()], dim=1)  # [b, n + N]
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)  # the positions generate used
        targets = out[:, 1:]  # token t+1 is predicted at position t

        def logps(model):
            logits = model(out, attention_mask=full_mask, position_ids=pos)[:, :-1]
            return logprobs_from_logits(logits, targets)[:, n - 1:]  # [b, N]: the response tokens only

        lp = logps(policy)
        if reference is None:
            with disable_lora(policy):
                lr = logps(policy)
        else:
            lr = logps(reference)
        ratio = (lp - lr) * resp  # [b, N]
        ratio_sum += float(ratio.sum())
        n_tokens += int(resp.sum())
        seq_kls += ratio.sum(-1).tolist()
    return {"kl_per_token": ratio_sum / max(n_tokens, 1), "kl_per_sequence": sum(seq_kls) / max(len(seq_kls), 1),
            "tokens": n_tokens, "mean_length": n_tokens / max(len(seq_kls), 1)}
