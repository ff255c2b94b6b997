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

Steps 1-2 are the rollout helpers of ``rollout.py`` (``sample_rollout``, ``response_logprobs``,
``score_responses``), shared with GRPO (``grpo.py``), which drops the critic; the numbers of step 5
are ``collapse.py``'s. With save_steps, a checkpoint every few steps (``rl_checkpoint.py``), from
which ``resume`` continues exactly as if the run had never stopped.
"""

from __future__ import annotations

import contextlib
import json
from contextlib import nullcontext
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from ..seed import seed_everything
from ..train.checkpoint import prune_checkpoints
from ..train.optim import make_optimizer
from ..train.output_dir import check_output_dir
from . import sharded
from .collapse import collapse_stats, collapse_warnings
from .logprobs import masked_mean
from .ppo import (AdaptiveKLController, FixedKLController, compute_gae, kl_penalty_rewards, masked_whiten, ppo_policy_loss,
                  ppo_value_loss)
from .rl_checkpoint import resume_rl, save_rl_checkpoint
from .rollout import Rollout, reference_logprobs, response_logprobs, sample_rollout, score_responses

__all__ = ["PPOConfig", "critic_values", "ppo_step", "run_steps", "train_ppo"]


@dataclass
class PPOConfig:
    """PPO knobs, under the names trl's PPOConfig / LLaMA-Factory use."""

    steps: int = 20  # PPO steps: each is one rollout batch and ppo_epochs of updates on it
    batch_size: int = 16  # rollouts (prompts) per step
    mini_batch_size: int = 8  # rollouts per gradient step inside a PPO epoch
    ppo_epochs: int = 4  # passes over each rollout batch
    learning_rate: float = 1e-5  # AdamW, the actor
    critic_learning_rate: float | None = None  # AdamW, the critic (None: learning_rate; OpenRLHF's name)
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
    temperature: float = 1.0  # sampling temperature of the rollouts; log-probs use the same (logits / T)
    top_k: int | None = None  # None: the full distribution (old_logp must be what we sampled from)
    max_grad_norm: float = 1.0  # clip each model's gradient norm
    seed: int = 0
    log_path: str | None = None  # JSONL, one record per step
    warn: bool = True  # print collapse_warnings as they fire
    save_steps: int = 0  # output_dir/checkpoint-{step}/ every N steps (0: none)
    output_dir: str | None = None  # where the checkpoints go
    resume: bool = False  # continue from the last checkpoint in output_dir (none there: from step 0)
    overwrite_output_dir: bool = False  # output_dir holds another run: delete its files first (else: an error)
    save_total_limit: int | None = None  # keep only the newest N checkpoints (None: all)
    fsdp: str | None = None  # under torchrun: "full_shard" / "shard_grad_op": each rank rolls out B / W prompts (sharded.py)

    def __post_init__(self):
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of mini_batch_size {self.mini_batch_size}")
        check_checkpointing(self)


def check_checkpointing(cfg):
    """save_steps and resume need a folder (PPOConfig and GRPOConfig)."""
    if (cfg.save_steps or cfg.resume) and not cfg.output_dir:
        raise ValueError("save_steps and resume need an output_dir (where the checkpoints are)")
    if cfg.save_steps < 0:
        raise ValueError(f"save_steps must be >= 0 (0: no checkpoints), got {cfg.save_steps}")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise ValueError(f"save_total_limit must be >= 1 (None: keep every checkpoint), got {cfg.save_total_limit}")


def critic_values(critic: nn.Module, roll: Rollout) -> torch.Tensor:
    """V(s_t) for each response token: the critic's value at the position *before* token t: [B, N].

    RewardModel.token_values uses default positions 0..T-1; with left padding they are shifted
    by the pad count, which RoPE ignores (it only sees position differences), and pads are masked.
    """
    values = critic.token_values(roll.ids, roll.attention_mask)  # [B, P + N]
    return values[:, roll.prompt_len - 1:-1]


# ---------------------------------------------------------------------------
# One PPO step
# ---------------------------------------------------------------------------


def ppo_step(actor, critic, reference, reward, opt_actor, opt_critic, prompts: list[list[int]], cfg: PPOConfig,
             kl_ctl, stop_ids: list[int], pad_id: int, step: int = 0, dp=None) -> dict:
    """Rollout, score, GAE, then ppo_epochs of minibatch updates. Returns the step's numbers.
    dp: on W processes (sharded.py), where this rank takes B / W of the prompts and the models are sharded."""
    B, mini_batch_size, seed = len(prompts), cfg.mini_batch_size, cfg.seed * 100_003 + step
    # 1-2. rollout and score: everything here is a constant for the updates below
    if dp is not None:  # New: this rank's share of the prompts and of each minibatch
        prompts, mini_batch_size = dp.share(prompts), mini_batch_size // dp.world
    with nullcontext(actor) if dp is None else dp.whole_actor() as sampler:  # dp: the actor gathered whole
        roll = sample_rollout(sampler, prompts, cfg.max_new_tokens, stop_ids, pad_id, cfg.temperature, cfg.top_k,
                              seed=seed if dp is None else dp.seed(seed))
    mask = roll.response_mask  # [B, N]
    with torch.no_grad():
        old_logp = response_logprobs(actor, roll, temperature=cfg.temperature)  # [B, N]
        ref_logp = reference_logprobs(reference, actor, roll, cfg.temperature)  # [B, N]
        old_values = critic_values(critic, roll)  # [B, N]
        scores = score_responses(reward, roll)  # [B]
        # 3. per-token rewards, advantages, returns
        rewards = kl_penalty_rewards(old_logp, ref_logp, scores, mask, kl_ctl.value)
        advantages, returns = compute_gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        seq_kls = ((old_logp - ref_logp) * mask).sum(1)  # [B] sequence KL, k1 estimate
        responses, all_mask = roll.responses, mask  # the whole batch's (for the statistics)
        if dp is not None:  # New: every rank's rollouts, for whitening and the statistics
            seq_kls, scores, responses, all_mask = map(dp.gather, (seq_kls, scores, responses, mask))
            all_advantages = dp.gather(advantages)
        if all_mask.sum() >= 2:
            if dp is None:
                advantages = masked_whiten(advantages, mask)
            else:  # New: whitened over the whole batch, then this rank's rows
                advantages = dp.mine(masked_whiten(all_advantages, all_mask), mask.shape[1])
        seq_kl = seq_kls.mean().item()

    # 4. PPO epochs over minibatches
    sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "entropy": 0.0,
            "value_clip_frac": 0.0}
    n_updates = 0
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(len(prompts), generator=g).split(mini_batch_size):
            sub, m = roll.index(mb), mask[mb]
            logp, ent = response_logprobs(actor, sub, with_entropy=True, temperature=cfg.temperature)
            pg_loss, clip_frac, approx_kl = ppo_policy_loss(logp, old_logp[mb], advantages[mb], m, cfg.cliprange)
            values = critic_values(critic, sub)
            vf_loss, vf_clip = ppo_value_loss(values, old_values[mb], returns[mb], m, cfg.cliprange_value)
            entropy = masked_mean(ent, m)
            # Actor and critic are separate networks here, so the sum just routes each loss to
            # its own parameters; vf_coef matters when they share a backbone (trl's value head).
            loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
            if dp is not None:  # New: FSDP averages the ranks' gradients: weight each by its share of the tokens
                loss = loss * dp.weight(m.sum())
            opt_actor.zero_grad(set_to_none=True)
            opt_critic.zero_grad(set_to_none=True)
            loss.backward()
            for model in (actor, critic):
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            opt_actor.step()
            opt_critic.step()
            numbers = {"policy_loss": pg_loss, "value_loss": vf_loss, "clip_frac": clip_frac, "approx_kl": approx_kl,
                       "entropy": entropy, "value_clip_frac": vf_clip}
            numbers = {k: float(v.detach()) for k, v in numbers.items()}
            if dp is not None:  # the whole minibatch's means
                numbers = dp.average(numbers, m.sum())
            for k, v in numbers.items():
                sums[k] += v
            n_updates += 1

    # 5. KL controller and the collapse watch
    kl_coef = kl_ctl.value
    kl_ctl.update(seq_kl, B)
    stats = {"step": step + 1, "reward": scores.mean().item(), "kl": seq_kl, "kl_coef": kl_coef,
             **{k: v / n_updates for k, v in sums.items()}, **collapse_stats(responses.cpu(), all_mask.cpu())}
    stats["warnings"] = collapse_warnings(stats)
    return stats


def run_steps(desc: str, n_steps: int, step_fn, log_path: str | None, postfix: dict, warn: bool = True,
              on_step=None, records: list[dict] | None = None, save_steps: int = 0, save=None,
              main: bool = True) -> list[dict]:
    """The loop both PPO and GRPO use: step_fn(step) -> record; tqdm postfix, JSONL log, warnings.

    postfix: {short name: record key} shown on the progress bar every step.
    records: those of steps 1..k of a resumed run; the loop goes on with step k + 1.
    save(step, records) is called every save_steps steps, after on_step (which may draw random numbers).
    main: False on the other ranks of a run on W processes (no log file, bar or warnings: rank 0 has them).
    """
    log_path = log_path if main else None
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    records = list(records or [])
    start = len(records)
    t0 = time.perf_counter() - (records[-1]["seconds"] if records else 0.0)  # the clock goes on from the checkpoint
    with open(log_path, "w") if log_path else contextlib.nullcontext() as log:
        if log:  # a resumed run's log starts over from the checkpoint's records: each step once, none lost
            log.writelines(json.dumps(rec) + "\n" for rec in records)
            log.flush()
        pbar = tqdm(range(start, n_steps), desc=desc, dynamic_ncols=True, initial=start, total=n_steps, disable=not main)
        for step in pbar:
            rec = step_fn(step)
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            records.append(rec)
            pbar.set_postfix({short: f"{rec[key]:.2f}" for short, key in postfix.items()})
            if warn and main:
                for w in rec.get("warnings", []):
                    tqdm.write(f"{desc} step {step + 1}: WARNING {w}")
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if on_step is not None:
                on_step(rec)
            if save_steps and (step + 1) % save_steps == 0:
                save(step + 1, records)
    return records


def train_ppo(actor, critic, reference, reward, prompts: list[list[int]], cfg: PPOConfig, stop_ids: list[int],
              pad_id: int, on_step=None) -> list[dict]:
    """Run cfg.steps PPO steps on batches drawn from ``prompts`` (token lists); returns the step records.

    actor: the policy (full, or with LoRA adapters: only trainable parameters are optimised);
    critic: a RewardModel used through token_values; reference: a frozen model, or None for
    "the actor with its LoRA adapters switched off"; reward: a RewardModel or a token rule (see
    score_responses / text_reward).  on_step(record) is called after each step (e.g. to evaluate).
    cfg.save_steps / cfg.resume: checkpoints in cfg.output_dir, and continuing from the last one
    (build the four models as for the first run; the trained weights come from the checkpoint).
    An output_dir holding another run is an error unless cfg.resume or cfg.overwrite_output_dir
    (train/output_dir.py); cfg.save_total_limit keeps the newest checkpoints only.
    cfg.fsdp under torchrun: W processes share each batch, the models sharded (sharded.py); the caller's
    models hold the whole trained weights again at the end.
    """
    check_output_dir(cfg)
    seed_everything(cfg.seed)
    for frozen in (reference, reward):
        if isinstance(frozen, nn.Module):
            frozen.eval().requires_grad_(False)  # pi_ref and the RM never change
    dp = sharded.start(cfg.fsdp, next(actor.parameters()).device)
    if dp is not None:  # New: each model becomes this rank's shards of it
        if cfg.batch_size % dp.world or cfg.mini_batch_size % dp.world:
            raise ValueError(f"batch_size {cfg.batch_size} and mini_batch_size {cfg.mini_batch_size} must split "
                             f"evenly over {dp.world} processes")
        whole = dict(actor=actor, critic=critic, reference=reference, reward=reward)
        shards = dp.shard(whole)
        actor, critic, reference, reward = (shards[k] for k in whole)
    opt_actor = make_optimizer(actor, cfg.learning_rate)
    opt_critic = make_optimizer(critic, cfg.critic_learning_rate or cfg.learning_rate)
    kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.horizon) if cfg.adap_kl_ctrl
              else FixedKLController(cfg.init_kl_coef))
    g = torch.Generator().manual_seed(cfg.seed)
    actor.train(), critic.train()
    # everything a step changes that is not a function of (seed, step): see rl_checkpoint.py
    models, optimizers = {"actor": actor, "critic": critic}, {"actor": opt_actor, "critic": opt_critic}
    records = resume_rl(cfg.output_dir, models, optimizers, g, kl_ctl, dp)[1] if cfg.resume else []

    def step_fn(step):
        batch = [prompts[i] for i in torch.randint(len(prompts), (cfg.batch_size,), generator=g).tolist()]
        return ppo_step(actor, critic, reference, reward, opt_actor, opt_critic, batch, cfg, kl_ctl,
                        stop_ids, pad_id, step, dp)

    def save(step, records):
        save_rl_checkpoint(cfg.output_dir, step, models, optimizers, g, records, kl_ctl, dp)
        if dp is None or dp.rank == 0:
            prune_checkpoints(cfg.output_dir, cfg.save_total_limit, step)

    records = run_steps("ppo", cfg.steps, step_fn, cfg.log_path, {"reward": "reward", "kl": "kl", "clip": "clip_frac",
                        "ent": "entropy", "len": "response_length", "rep": "repetition_rate"}, cfg.warn, on_step,
                        records, cfg.save_steps, save, main=dp is None or dp.rank == 0)
    if dp is not None:
        dp.unshard(shards)
    return records
