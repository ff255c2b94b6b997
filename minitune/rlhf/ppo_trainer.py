"""The PPO loop of RLHF, with its four models in plain sight.

InstructGPT (Ouyang et al. 2022, section 3.5) runs PPO with four networks:

    actor      pi        the policy being trained (starts as the SFT model)
    critic     V         a value per token, trained alongside (here: RewardModel.token_values)
    reference  pi_ref    the frozen SFT model; the KL to it is the leash
    reward     RM        the frozen reward model (or a rule standing in for one)

One PPO step (the math is in ``ppo.py``):

    1. rollout:  sample a response to each prompt with the actor (KV-cache generator)
    2. score:    logp = log pi(a_t|s_t), ref_logp = log pi_ref(a_t|s_t), V_t = critic, score = RM
    3. rewards = kl_penalty_rewards(...);  A, R = compute_gae(...);  A = whiten(A)
    4. ppo_epochs passes over minibatches: clipped policy loss + vf_coef * clipped value loss
                                            - ent_coef * entropy
    5. the KL controller sees the batch's KL; log the collapse watch numbers

The rollout helpers (``sample_rollout``, ``response_logprobs``, ``score_responses``) are shared
with GRPO (``grpo.py``), which keeps steps 1-2 and drops the critic.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from ..generation import generate
from ..train.optim import make_optimizer
from ..train.trainer import seed_everything
from .ppo import (
    AdaptiveKLController,
    FixedKLController,
    collapse_stats,
    collapse_warnings,
    compute_gae,
    entropy_from_logits,
    kl_penalty_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)

__all__ = ["PPOConfig", "Rollout", "sample_rollout", "response_logprobs", "score_responses", "text_reward",
           "reference_logprobs", "ppo_step", "run_steps", "train_ppo"]


@dataclass
class PPOConfig:
    """PPO knobs, under the names trl's PPOConfig / LLaMA-Factory use."""

    steps: int = 20  # PPO steps: each is one rollout batch and ppo_epochs of updates on it
    batch_size: int = 16  # rollouts (prompts) per step
    mini_batch_size: int = 8  # rollouts per gradient step inside a PPO epoch
    ppo_epochs: int = 4  # passes over each rollout batch
    learning_rate: float = 1e-5  # AdamW, actor and critic
    init_kl_coef: float = 0.2  # beta of the per-token KL penalty
    adap_kl_ctrl: bool = False  # adapt beta toward target_kl (Ziegler et al. 2019)
    target_kl: float = 6.0  # target sequence KL (nats) for the adaptive controller
    horizon: int = 10000  # adaptive controller horizon, in rollouts
    gamma: float = 1.0  # discount: 1, the episode is one short response
    lam: float = 0.95  # GAE lambda: bias (0) vs variance (1) of the advantage
    cliprange: float = 0.2  # policy ratio clip epsilon
    cliprange_value: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1  # weight of the value loss
    ent_coef: float = 0.0  # weight of the entropy bonus (0: off, as in InstructGPT)
    max_new_tokens: int = 24  # longest response
    temperature: float = 1.0  # sampling temperature of the rollouts (1: the policy itself)
    top_k: int | None = None  # None: the full distribution (old_logp must be what we sampled from)
    max_grad_norm: float = 1.0  # clip each model's gradient norm
    seed: int = 0
    log_path: str | None = None  # JSONL, one record per step
    warn: bool = True  # print collapse_warnings as they fire

    def __post_init__(self):
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of mini_batch_size {self.mini_batch_size}")


# ---------------------------------------------------------------------------
# Rollouts (shared with GRPO)
# ---------------------------------------------------------------------------


@dataclass
class Rollout:
    """One batch of sampled responses. P = prompt columns (left-padded), N = response columns."""

    ids: torch.Tensor  # [B, P + N] prompt then response tokens
    attention_mask: torch.Tensor  # [B, P + N] 1 = real (left padding and after-EOS filler are 0)
    response_mask: torch.Tensor  # [B, N] real response tokens, the stop token included
    prompt_len: int  # P

    @property
    def responses(self) -> torch.Tensor:  # [B, N]
        return self.ids[:, self.prompt_len:]

    def index(self, rows) -> "Rollout":
        return Rollout(self.ids[rows], self.attention_mask[rows], self.response_mask[rows], self.prompt_len)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, P], mask [B, P]) left-padded, so every row's next token is column P."""
    P = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (P - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def response_mask_from(responses: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """[B, N] -> [B, N] 1 up to and including the first stop token (all N if none: truncated)."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    # stops strictly before column t: cumsum shifted right by one
    before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    return (before == 0).long()


@torch.no_grad()
def sample_rollout(actor: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                   pad_id: int, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None) -> Rollout:
    """Sample one response per prompt with the KV-cache generator."""
    device = next(actor.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)  # [B, P]
    was_training = actor.training
    actor.eval()
    out = generate(actor, ids, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=stop_ids,
                   attention_mask=mask, seed=seed)  # [B, P + N]
    actor.train(was_training)
    resp_mask = response_mask_from(out[:, ids.shape[1]:], stop_ids)  # [B, N]
    return Rollout(out, torch.cat([mask, resp_mask], dim=1), resp_mask, ids.shape[1])


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, as the generator used them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model: nn.Module, roll: Rollout, with_entropy: bool = False):
    """log pi(a_t | s_t) of every response token: -> logp [B, N] (and entropy [B, N]).

    The logits at column P-1+t predict response token t, hence the slice [P-1 : -1].
    """
    logits = model(roll.ids, attention_mask=roll.attention_mask, position_ids=_positions(roll.attention_mask))
    logits = logits[:, roll.prompt_len - 1:-1]  # [B, N, V]
    logp = logprobs_from_logits(logits, roll.responses)
    if with_entropy:
        return logp, entropy_from_logits(logits)
    return logp


@torch.no_grad()
def reference_logprobs(reference: nn.Module | None, actor: nn.Module, roll: Rollout) -> torch.Tensor:
    """log pi_ref of the response tokens.  reference=None: the actor with its LoRA adapters off
    (the same frozen base weights the actor started from), so no second copy of the model."""
    if reference is not None:
        return response_logprobs(reference, roll)
    from ..peft import lora  # disable_lora lives with the LoRA code

    if not hasattr(lora, "disable_lora"):
        raise RuntimeError("reference=None needs minitune.peft.lora.disable_lora (a LoRA actor); pass a reference model")
    with lora.disable_lora(actor):
        return response_logprobs(actor, roll)


def critic_values(critic: nn.Module, roll: Rollout) -> torch.Tensor:
    """V(s_t) for each response token: the critic's value at the position *before* token t: [B, N].

    RewardModel.token_values uses default positions 0..T-1; with left padding they are shifted
    by the pad count, which RoPE ignores (it only sees position differences), and pads are masked.
    """
    values = critic.token_values(roll.ids, roll.attention_mask)  # [B, P + N]
    return values[:, roll.prompt_len - 1:-1]


def text_reward(rule, tok, stop_ids: list[int]):
    """Turn a text rule ``rule(prompt, response) -> float`` into the token reward ``score_responses`` takes."""
    def reward(prompt_ids: list[int], response_ids: list[int]) -> float:
        return float(rule(tok.decode(prompt_ids, skip_special_tokens=True),
                          tok.decode([t for t in response_ids if t not in stop_ids], skip_special_tokens=True).strip()))
    return reward


@torch.no_grad()
def score_responses(reward, roll: Rollout) -> torch.Tensor:
    """Sequence scores [B]: a reward model (nn.Module, read at the last real token) or a rule
    ``reward(prompt_ids, response_ids) -> float`` on the real tokens of each row."""
    if isinstance(reward, nn.Module):
        return reward(roll.ids, roll.attention_mask).float()
    P, scores = roll.prompt_len, []
    for ids, m in zip(roll.ids.tolist(), roll.attention_mask.tolist()):
        prompt = [t for t, real in zip(ids[:P], m[:P]) if real]
        response = [t for t, real in zip(ids[P:], m[P:]) if real]
        scores.append(float(reward(prompt, response)))
    return torch.tensor(scores, device=roll.ids.device)


# ---------------------------------------------------------------------------
# One PPO step
# ---------------------------------------------------------------------------


def ppo_step(actor, critic, reference, reward, opt_actor, opt_critic, prompts: list[list[int]], cfg: PPOConfig,
             kl_ctl, stop_ids: list[int], pad_id: int, step: int = 0) -> dict:
    """Rollout, score, GAE, then ppo_epochs of minibatch updates. Returns the step's numbers."""
    # 1-2. rollout and score: everything here is a constant for the updates below
    roll = sample_rollout(actor, prompts, cfg.max_new_tokens, stop_ids, pad_id, cfg.temperature, cfg.top_k,
                          seed=cfg.seed * 100_003 + step)
    mask = roll.response_mask  # [B, N]
    with torch.no_grad():
        old_logp = response_logprobs(actor, roll)  # [B, N]
        ref_logp = reference_logprobs(reference, actor, roll)  # [B, N]
        old_values = critic_values(critic, roll)  # [B, N]
        scores = score_responses(reward, roll)  # [B]
        # 3. per-token rewards, advantages, returns
        rewards = kl_penalty_rewards(old_logp, ref_logp, scores, mask, kl_ctl.value)
        advantages, returns = compute_gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if mask.sum() >= 2:
            advantages = masked_whiten(advantages, mask)
        seq_kl = ((old_logp - ref_logp) * mask).sum(1).mean().item()  # sequence KL, k1 estimate

    # 4. PPO epochs over minibatches
    B, sums = len(prompts), {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0,
                             "entropy": 0.0, "value_clip_frac": 0.0}
    n_updates = 0
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(B, generator=g).split(cfg.mini_batch_size):
            sub, m = roll.index(mb), mask[mb]
            logp, ent = response_logprobs(actor, sub, with_entropy=True)
            pg_loss, clip_frac, approx_kl = ppo_policy_loss(logp, old_logp[mb], advantages[mb], m, cfg.cliprange)
            values = critic_values(critic, sub)
            vf_loss, vf_clip = ppo_value_loss(values, old_values[mb], returns[mb], m, cfg.cliprange_value)
            entropy = masked_mean(ent, m)
            # Actor and critic are separate networks here, so the sum just routes each loss to
            # its own parameters; vf_coef matters when they share a backbone (trl's value head).
            loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
            opt_actor.zero_grad(set_to_none=True)
            opt_critic.zero_grad(set_to_none=True)
            loss.backward()
            for model in (actor, critic):
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            opt_actor.step()
            opt_critic.step()
            for k, v in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clip_frac", clip_frac),
                         ("approx_kl", approx_kl), ("entropy", entropy), ("value_clip_frac", vf_clip)):
                sums[k] += float(v.detach())
            n_updates += 1

    # 5. KL controller and the collapse watch
    kl_coef = kl_ctl.value
    kl_ctl.update(seq_kl, B)
    stats = {"step": step + 1, "reward": scores.mean().item(), "kl": seq_kl, "kl_coef": kl_coef,
             **{k: v / n_updates for k, v in sums.items()}, **collapse_stats(roll.responses, mask)}
    stats["warnings"] = collapse_warnings(stats)
    return stats


def run_steps(desc: str, n_steps: int, step_fn, log_path: str | None, postfix: dict, warn: bool = True,
              on_step=None) -> list[dict]:
    """The loop both PPO and GRPO use: step_fn(step) -> record; tqdm postfix, JSONL log, warnings.

    postfix: {short name: record key} shown on the progress bar every step.
    """
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    records, t0 = [], time.perf_counter()
    with open(log_path, "w") if log_path else contextlib.nullcontext() as log:
        pbar = tqdm(range(n_steps), desc=desc, dynamic_ncols=True)
        for step in pbar:
            rec = step_fn(step)
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            records.append(rec)
            pbar.set_postfix({short: f"{rec[key]:.2f}" for short, key in postfix.items()})
            if warn:
                for w in rec.get("warnings", []):
                    tqdm.write(f"{desc} step {step + 1}: WARNING {w}")
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if on_step is not None:
                on_step(rec)
    return records


def train_ppo(actor, critic, reference, reward, prompts: list[list[int]], cfg: PPOConfig, stop_ids: list[int],
              pad_id: int, on_step=None) -> list[dict]:
    """Run cfg.steps PPO steps on batches drawn from ``prompts`` (token lists); returns the step records.

    actor: the policy (full, or with LoRA adapters: only trainable parameters are optimised);
    critic: a RewardModel used through token_values; reference: a frozen model, or None for
    "the actor with its LoRA adapters switched off"; reward: a RewardModel or a token rule (see
    score_responses / text_reward).  on_step(record) is called after each step (e.g. to evaluate).
    """
    seed_everything(cfg.seed)
    for frozen in (reference, reward):
        if isinstance(frozen, nn.Module):
            frozen.eval().requires_grad_(False)  # pi_ref and the RM never change
    opt_actor = make_optimizer(actor, cfg.learning_rate)
    opt_critic = make_optimizer(critic, cfg.learning_rate)
    kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.horizon) if cfg.adap_kl_ctrl
              else FixedKLController(cfg.init_kl_coef))
    g = torch.Generator().manual_seed(cfg.seed)
    actor.train(), critic.train()

    def step_fn(step):
        batch = [prompts[i] for i in torch.randint(len(prompts), (cfg.batch_size,), generator=g).tolist()]
        return ppo_step(actor, critic, reference, reward, opt_actor, opt_critic, batch, cfg, kl_ctl,
                        stop_ids, pad_id, step)

    return run_steps("ppo", cfg.steps, step_fn, cfg.log_path, {"reward": "reward", "kl": "kl", "clip": "clip_frac",
                     "ent": "entropy", "len": "response_length", "rep": "repetition_rate"}, cfg.warn, on_step)
