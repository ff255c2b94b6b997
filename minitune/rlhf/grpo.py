"""GRPO: Group Relative Policy Optimization, the math.

GRPO (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
Open Language Models", section 4.1) drops PPO's critic.  For each prompt it samples a
group of G responses, scores them (here with a rule: is the arithmetic right?), and uses
the group itself as the baseline:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)      same A_i for every token of o_i

The loss is PPO's clipped surrogate plus a KL penalty to the reference, estimated per
token with Schulman's k3 estimator (http://joschu.net/blog/kl-approx.html), which is
unbiased and always >= 0:

    k3_t   = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1
    l_t    = -min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i) + beta * k3_t
    loss   = mean_i [ (1/|o_i|) sum_t l_t ]

Normalisation: as in the paper, each sequence's tokens are averaged first (1/|o_i|), then
sequences are averaged, so every response weighs the same whatever its length.  (Later
work, e.g. DAPO, averages over all tokens of the batch instead; not done here.)

The loop (``grpo_step`` / ``train_grpo``) reuses PPO's rollout helpers (``rollout.py``):
sample G responses per prompt, score them with the rule, group-normalise, then a few clipped
updates.  Two models only: the actor and the frozen reference (no critic, no learned reward model).
Checkpoints and resuming are PPO's (``rl_checkpoint.py``), less the critic and the KL controller.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..seed import seed_everything
from ..train.checkpoint import prune_checkpoints
from ..train.optim import make_optimizer
from ..train.output_dir import check_output_dir
from . import sharded
from .collapse import collapse_stats, collapse_warnings
from .logprobs import masked_mean
from .ppo_trainer import check_checkpointing, run_steps
from .rl_checkpoint import resume_rl, save_rl_checkpoint
from .rollout import reference_logprobs, response_logprobs, sample_rollout, score_responses

__all__ = ["group_advantages", "grpo_loss", "arithmetic_reward", "GRPOConfig", "grpo_step", "train_grpo"]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages: [B] rewards, B = n_prompts * group_size -> [B].

    Rewards must be laid out group by group (the G samples of prompt 0, then of prompt 1...).
    std is the unbiased sample std (torch's default, as trl's GRPOTrainer uses).  A group
    where every sample got the same reward has std 0 and advantage 0: nothing to learn.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be [n_prompts * group_size], got {tuple(rewards.shape)} with group_size {group_size}")
    # BEGIN EXERCISE 13.1: group-normalised advantages
    grouped = rewards.view(-1, group_size).to(torch.float32)  # [n_prompts, G]
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)
    # END EXERCISE


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, mean_kl, clip_frac).

    logp, old_logp, ref_logp, mask: [B, T] over response tokens; advantages: [B] (one per
    response).  mean_kl and clip_frac are detached token means over real tokens, for logging.
    """
    # BEGIN EXERCISE 13.2: the GRPO loss
    mask_f = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # [B, 1]: broadcast to every token
    ratio = torch.exp(logp - old_logp)  # [B, T]
    surr_unclipped = ratio * adv
    surr_clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * adv
    policy_term = -torch.min(surr_unclipped, surr_clipped)

    log_ratio_ref = ref_logp - logp
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1  # [B, T] k3 >= 0

    per_token = policy_term + beta * kl
    # Sequence-level mean: (1/|o_i|) sum_t, then the mean over responses.
    per_seq = (per_token * mask_f).sum(dim=1) / mask_f.sum(dim=1).clamp(min=1)  # [B]
    loss = per_seq.mean()
    with torch.no_grad():
        mean_kl = masked_mean(kl, mask_f)
        clip_frac = masked_mean((surr_clipped < surr_unclipped).to(logp.dtype), mask_f)
    return loss, mean_kl, clip_frac
    # END EXERCISE


_PROBLEM = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=")  # "12+7=", "3 * 4 ="
# Question phrasings (the tiny world's "What is 3+4?", "How much is 3 plus 4?", "Add 3 and 4."):
_WORDED = re.compile(r"(-?\d+)\s*([+\-*]|plus|minus|times)\s*(-?\d+)|(?:sum of|add)\s+(-?\d+)\s+and\s+(-?\d+)", re.I)
_NUMBER = re.compile(r"-?\d+")
_OPS = {"+": "+", "plus": "+", "-": "-", "minus": "-", "*": "*", "times": "*"}


def arithmetic_problem(prompt: str) -> tuple[int, str, int]:
    """(a, op, b) of the last problem in the prompt: "a op b =" first, else a worded question."""
    problems = _PROBLEM.findall(prompt)
    if problems:
        a, op, b = problems[-1]
        return int(a), op, int(b)
    worded = _WORDED.findall(prompt)
    if not worded:
        raise ValueError(f"no 'a+b=' style problem (nor 'a plus b', 'sum of a and b') found in prompt {prompt!r}")
    a, op, b, sa, sb = worded[-1]
    return (int(a), _OPS[op.lower()], int(b)) if op else (int(sa), "+", int(sb))


def arithmetic_reward(prompt: str, response: str) -> float:
    """Rule-checked reward: 1.0 if the first integer in the response is the answer, else 0.0.

    The problem is the last "a op b =" in the prompt (op one of + - *), so a chat template
    or instructions before it do not matter; without one, a question such as "What is 3+4?"
    or "Tell me the sum of 3 and 4." (the tiny world's phrasings).  No number in the
    response -> 0.0.  A rule, not a learned RM: it cannot be reward-hacked, which is why
    GRPO-style training on checkable tasks (maths, code) works so well.
    """
    a, op, b = arithmetic_problem(prompt)
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    found = _NUMBER.search(response)
    return 1.0 if found is not None and int(found.group()) == answer else 0.0


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    """GRPO knobs, under trl's GRPOConfig names where it has them."""

    steps: int = 20  # GRPO steps: each samples a fresh batch
    batch_size: int = 8  # prompts per step
    num_generations: int = 8  # G, responses sampled per prompt (the group)
    mini_batch_size: int = 16  # responses per gradient step
    num_iterations: int = 1  # passes over each batch (trl's mu; > 1 is when the clip starts to bite)
    learning_rate: float = 1e-5
    beta: float = 0.04  # weight of the k3 KL to the reference (trl's default)
    cliprange: float = 0.2  # epsilon of the clipped ratio
    max_new_tokens: int = 16
    temperature: float = 1.0  # sampling temperature (the group needs diversity); log-probs use logits / T
    top_k: int | None = None
    max_grad_norm: float = 1.0
    seed: int = 0
    log_path: str | None = None  # JSONL, one record per step
    warn: bool = True  # print collapse_warnings as they fire
    save_steps: int = 0  # output_dir/checkpoint-{step}/ every N steps (0: none)
    output_dir: str | None = None  # where the checkpoints go
    resume: bool = False  # continue from the last checkpoint in output_dir (none there: from step 0)
    overwrite_output_dir: bool = False  # output_dir holds another run: delete its files first (else: an error)
    save_total_limit: int | None = None  # keep only the newest N checkpoints (None: all)
    fsdp: str | None = None  # under torchrun: "full_shard" / "shard_grad_op": each rank takes B / W prompts (sharded.py)

    def __post_init__(self):
        if (self.batch_size * self.num_generations) % self.mini_batch_size:
            raise ValueError(f"batch_size * num_generations = {self.batch_size * self.num_generations} must be a "
                             f"multiple of mini_batch_size {self.mini_batch_size}")
        check_checkpointing(self)


def grpo_step(actor, reference, reward, optimizer, prompts: list[list[int]], cfg: GRPOConfig, stop_ids: list[int],
              pad_id: int, step: int = 0, dp=None) -> dict:
    """Sample G responses per prompt, score, group-normalise, then clipped updates. Returns the numbers.
    dp: on W processes (sharded.py), where this rank takes B / W of the prompts (whole groups)."""
    G, mini_batch_size, seed = cfg.num_generations, cfg.mini_batch_size, cfg.seed * 100_003 + step
    if dp is not None:  # New: this rank's share of the prompts, before the copies: a group stays on one rank
        prompts, mini_batch_size = dp.share(prompts), mini_batch_size // dp.world
    rows = [p for p in prompts for _ in range(G)]  # group by group: the layout group_advantages expects
    with nullcontext(actor) if dp is None else dp.whole_actor() as sampler:  # dp: the actor gathered whole
        roll = sample_rollout(sampler, rows, cfg.max_new_tokens, stop_ids, pad_id, cfg.temperature, cfg.top_k,
                              seed=seed if dp is None else dp.seed(seed))
    mask = roll.response_mask  # [B*G, N]
    with torch.no_grad():
        old_logp = response_logprobs(actor, roll, temperature=cfg.temperature)  # [B*G, N]
        ref_logp = reference_logprobs(reference, actor, roll, cfg.temperature)
        scores = score_responses(reward, roll)  # [B*G]
        advantages = group_advantages(scores, G)  # [B*G]
        seq_kls = ((old_logp - ref_logp) * mask).sum(1)  # [B*G] sequence KL at the rollout (k1)
        responses, all_mask = roll.responses, mask  # the whole batch's (for the statistics)
        if dp is not None:  # New: every rank's rollouts, for the statistics
            seq_kls, scores, responses, all_mask = map(dp.gather, (seq_kls, scores, responses, mask))
        flat_groups = (scores.view(-1, G).std(dim=1) == 0).float().mean().item()

    sums, n_updates = {"loss": 0.0, "token_kl": 0.0, "clip_frac": 0.0}, 0
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    for _ in range(cfg.num_iterations):
        for mb in torch.randperm(len(rows), generator=g).split(mini_batch_size):
            logp = response_logprobs(actor, roll.index(mb), temperature=cfg.temperature)
            loss, kl, clip_frac = grpo_loss(logp, old_logp[mb], ref_logp[mb], advantages[mb], mask[mb],
                                            cfg.cliprange, cfg.beta)
            numbers = {"loss": float(loss.detach()), "token_kl": float(kl), "clip_frac": float(clip_frac)}
            if dp is not None:  # New: FSDP averages the ranks' gradients: weight each by its share of the responses
                loss = loss * dp.weight(len(mb))
                # the loss is a mean over responses, its KL and clip fraction means over tokens
                numbers = {"loss": dp.average({"loss": numbers["loss"]}, len(mb))["loss"],
                           **dp.average({k: numbers[k] for k in ("token_kl", "clip_frac")}, mask[mb].sum())}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in actor.parameters() if p.requires_grad], cfg.max_grad_norm)
            optimizer.step()
            for k, v in numbers.items():
                sums[k] += v
            n_updates += 1

    seq_kl = seq_kls.mean().item()
    stats = {"step": step + 1, "reward": scores.mean().item(), "kl": seq_kl, "flat_groups": flat_groups,
             **{k: v / n_updates for k, v in sums.items()}, **collapse_stats(responses.cpu(), all_mask.cpu())}
    stats["warnings"] = collapse_warnings(stats)
    return stats


def train_grpo(actor, reference, reward, prompts: list[list[int]], cfg: GRPOConfig, stop_ids: list[int],
               pad_id: int, on_step=None) -> list[dict]:
    """Run cfg.steps GRPO steps on prompts drawn from ``prompts`` (token lists); returns the step records.

    reference: a frozen model, or None for the actor with its LoRA adapters off; reward: a rule
    ``reward(prompt_ids, response_ids)`` (see rollout.text_reward) or a RewardModel.
    cfg.save_steps / cfg.resume: checkpoints in cfg.output_dir, and continuing from the last one; an
    output_dir holding another run is an error unless cfg.resume or cfg.overwrite_output_dir
    (train/output_dir.py); cfg.save_total_limit keeps the newest checkpoints only.
    cfg.fsdp under torchrun: W processes share each batch, the models sharded (sharded.py).
    """
    check_output_dir(cfg)
    seed_everything(cfg.seed)
    for frozen in (reference, reward):
        if isinstance(frozen, nn.Module):
            frozen.eval().requires_grad_(False)
    dp = sharded.start(cfg.fsdp, next(actor.parameters()).device)
    if dp is not None:  # New: each model becomes this rank's shards of it
        if cfg.batch_size % dp.world or cfg.mini_batch_size % dp.world:
            raise ValueError(f"batch_size {cfg.batch_size} prompts and mini_batch_size {cfg.mini_batch_size} must "
                             f"split evenly over {dp.world} processes")
        shards = dp.shard(dict(actor=actor, reference=reference, reward=reward))
        actor, reference, reward = shards["actor"], shards["reference"], shards["reward"]
    optimizer = make_optimizer(actor, cfg.learning_rate)
    g = torch.Generator().manual_seed(cfg.seed)
    actor.train()
    # everything a step changes that is not a function of (seed, step): see rl_checkpoint.py
    models, optimizers = {"actor": actor}, {"actor": optimizer}
    records = resume_rl(cfg.output_dir, models, optimizers, g, dp=dp)[1] if cfg.resume else []

    def step_fn(step):
        batch = [prompts[i] for i in torch.randint(len(prompts), (cfg.batch_size,), generator=g).tolist()]
        return grpo_step(actor, reference, reward, optimizer, batch, cfg, stop_ids, pad_id, step, dp)

    def save(step, records):
        save_rl_checkpoint(cfg.output_dir, step, models, optimizers, g, records, dp=dp)
        if dp is None or dp.rank == 0:
            prune_checkpoints(cfg.output_dir, cfg.save_total_limit, step)

    records = run_steps("grpo", cfg.steps, step_fn, cfg.log_path, {"reward": "reward", "kl": "kl",
                        "flat": "flat_groups", "len": "response_length"}, cfg.warn, on_step, records, cfg.save_steps,
                        save, main=dp is None or dp.rank == 0)
    if dp is not None:
        dp.unshard(shards)
    return records
