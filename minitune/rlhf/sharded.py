"""PPO and GRPO on W processes: each rank rolls out its share of the prompts, the models sharded (lesson 14).

The trainer's stages (sft, pt, rm, dpo, kto, ...) are data parallel and sharded by train/trainer.py.
The RL loops (ppo_trainer.py, grpo.py) have steps of their own; this is what they add on W processes
(`fsdp: full_shard` or `shard_grad_op`, started by torchrun), step by step:

    prompts   the step's B prompts are drawn alike on every rank (the same seeded generator); rank r
              takes B / W of them. GRPO splits prompts before making the G copies, so a group never
              spans two ranks and its advantages need nothing from another rank.
    rollout   the actor's whole weights are gathered into the caller's actor (emptied while training),
              which samples with the plain generator, and emptied again: `whole_actor`. Decoding token
              by token through the shards would all-gather every layer for every token, and a rank whose
              responses all ended early would stop calling the collectives the others wait in.
              DeepSpeed-Chat's "hybrid engine" gathers the actor for generation the same way.
    score     actor, reference, critic and reward-model forwards on this rank's rollouts (each sharded
              model all-gathers one block at a time, as in training)
    whiten    PPO whitens the advantages over the whole batch: gathered from every rank, whitened with
              masked_whiten as on one process, each rank keeping its rows
    update    each rank's loss is a mean over its own tokens (GRPO: its responses); FSDP averages the W
              gradients, so the loss is weighted by W * n_rank / n_total first (`weight`): the result is
              the gradient of the whole minibatch's mean, as on one process
    log       the records are the whole batch's (rollouts gathered, losses averaged by their weights)

Which models are sharded: the actor and PPO's critic (they train: FSDP also averages their gradients),
and the frozen reference and reward model when they are models (forward only): between uses each rank
holds 1/W of each of the four. The rollout needs the actor's whole weights on every rank for its length
(in the actor's dtype): the peak is one whole actor plus the shards.

Each rank samples with its own seed (rank 0 with one process's), so W processes draw other samples than
one process would; given the same rollouts, and one minibatch per epoch (each rank then takes 1 / W of
it, while with several each rank shuffles its own rows), they take one process's steps within float
rounding (tests/test_fsdp_rl.py). A minibatch split over W ranks needs mini_batch_size divisible by W.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.fsdp import register_fsdp_forward_method

from ..model.checkpoint import CheckpointError, save_safetensors
from ..model.transformer import Block
from ..train import distributed as dist
from ..train import fsdp
from ..train.checkpoint import read_state, read_tensors, rng_state, set_rng_state

__all__ = ["DataParallelRL", "start"]

MODEL_FILE, OPTIM_FILE = "{name}-rank{r}-of-{w}.safetensors", "optimizers-rank{r}-of-{w}.pt"


def start(option: str | None, device: torch.device) -> "DataParallelRL | None":
    """The data-parallel context of a PPO / GRPO run under torchrun with `fsdp` set; None on one process
    (where an fsdp setting only prints that it is not sharding)."""
    sharding = fsdp.parse_fsdp(option)
    rank, world = dist.world()
    if sharding is None or world == 1:
        if sharding is not None:
            print(f"note: fsdp {sharding} on one process is not sharding (nothing to split the model with); "
                  "start several with torchrun --nproc_per_node N")
        return None
    dist.setup(device.type)
    return DataParallelRL(rank, world, sharding, device)


class DataParallelRL:
    """What ppo_step / grpo_step call on W processes (the module docstring says when)."""

    def __init__(self, rank: int, world: int, sharding: fsdp.Sharding, device: torch.device):
        self.rank, self.world, self.sharding, self.device = rank, world, sharding, device
        self.actor = self.sharded_actor = None
        self.originals: dict[str, nn.Module] = {}

    def shard(self, models: dict) -> dict:
        """{name: model or None or a rule} -> the same with every model sharded (fp32: the RL loops train in
        float32). models["actor"] is kept: `whole_actor` gathers into it. Call `unshard` at the end."""
        out = {}
        for name, m in models.items():
            if isinstance(m, nn.Module) and any(isinstance(b, Block) for b in m.modules()):
                self.originals[name] = m
                out[name] = fsdp.shard_model(m, self.sharding, False, self.device)
                if hasattr(out[name], "token_values"):  # the critic is read per token, not through forward
                    register_fsdp_forward_method(out[name], "token_values")
            else:
                out[name] = m
        self.actor, self.sharded_actor = self.originals["actor"], out["actor"]
        return out

    def unshard(self, sharded: dict):
        """Every rank gets the whole trained (and frozen) models back into the caller's objects."""
        for name, m in self.originals.items():
            fsdp.gather_into(m, sharded[name])

    def share(self, rows: list) -> list:
        """This rank's B / W rows of the step's batch, a contiguous block (GRPO's groups stay together)."""
        if len(rows) % self.world:
            raise ValueError(f"{len(rows)} prompts per step do not split evenly over {self.world} processes")
        n = len(rows) // self.world
        return rows[self.rank * n:(self.rank + 1) * n]

    def seed(self, seed: int) -> int:
        """Each rank samples its rollouts with its own seed; rank 0 with one process's."""
        return seed + 1_000_003 * self.rank

    @contextmanager
    def whole_actor(self):
        """The actor's whole weights in the caller's actor, for sampling (every rank enters together)."""
        fsdp.gather_into(self.actor, self.sharded_actor)
        try:
            yield self.actor
        finally:
            with torch.no_grad():
                for p in self.actor.parameters():
                    p.data = p.data.new_empty(0)

    def gather(self, t: torch.Tensor, fill=0) -> torch.Tensor:
        """Every rank's rows of t [b, ...], dim 1 padded with `fill` to the longest: [W * b, ...]."""
        t = t.to(self.device)
        if t.dim() > 1:
            longest = int(max(dist.all_reduce_max([t.shape[1]], self.device)))
            t = torch.cat([t, t.new_full((t.shape[0], longest - t.shape[1], *t.shape[2:]), fill)], dim=1)
        return dist.all_gather_rows(t)

    def mine(self, t: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """This rank's rows of a gathered tensor (dim 1 cut back to `width`)."""
        n = t.shape[0] // self.world
        rows = t[self.rank * n:(self.rank + 1) * n]
        return rows if width is None else rows[:, :width]

    def weight(self, n_mine) -> float:
        """W * n_rank / n_total: the factor that makes FSDP's average of the W ranks' gradients the gradient
        of the whole minibatch's mean (n: its real tokens, or responses for GRPO's per-response mean)."""
        total = dist.all_reduce_sum([float(n_mine)], self.device)[0]
        return self.world * float(n_mine) / max(total, 1.0)

    def average(self, sums: dict, n_mine) -> dict:
        """{name: mean over this rank's n_mine items} -> the means over every rank's items, by weight."""
        names = sorted(sums)
        values = dist.all_reduce_sum([float(n_mine)] + [sums[k] * float(n_mine) for k in names], self.device)
        return {k: v / max(values[0], 1.0) for k, v in zip(names, values[1:])}

    # -- checkpoints: each rank writes its shards, rank 0 the rest (as train/fsdp.py's save_sharded) --------

    def save(self, final: Path, models: dict, optimizers: dict, state: dict):
        """final/: per rank its shards of each trained model and its AdamW moments; rank 0 trainer_state.pt."""
        r, w = self.rank, self.world
        with fsdp.all_ranks_write(final) as tmp:
            for name, m in models.items():
                tensors = {n: fsdp.local(p).detach().cpu().contiguous() for n, p in m.named_parameters()
                           if p.requires_grad}
                save_safetensors(tensors, tmp / MODEL_FILE.format(name=name, r=r, w=w), metadata={"format": "pt"})
            torch.save({"optimizers": {k: fsdp.optimizer_state(o) for k, o in optimizers.items()}, "rng": rng_state()},
                       tmp / OPTIM_FILE.format(r=r, w=w))
            if r == 0:
                torch.save({**state, "fsdp_world_size": w}, tmp / "trainer_state.pt")
                (tmp / "trainer_state.json").write_text(f'{{"global_step": {state["global_step"]}, '
                                                        f'"fsdp_world_size": {w}}}\n')

    def load(self, path: Path, models: dict, optimizers: dict) -> dict:
        """The inverse of save, on the same W; returns rank 0's state (generator, records, KL coefficient)."""
        r, w = self.rank, self.world
        state = read_state(path / "trainer_state.pt")
        if state.get("fsdp_world_size") != w:
            wrote = state.get("fsdp_world_size")
            raise CheckpointError(f"{path}: written by {f'{wrote} FSDP processes' if wrote else 'one process'}, "
                                  f"now {w}; resume with the same fsdp setting and --nproc_per_node")
        mine = read_state(path / OPTIM_FILE.format(r=r, w=w))
        for name, m in models.items():
            file = path / MODEL_FILE.format(name=name, r=r, w=w)
            weights = read_tensors(file)
            own = {n: p for n, p in m.named_parameters() if p.requires_grad}
            if set(weights) != set(own) or any(weights[n].shape != fsdp.local(own[n]).shape for n in own):
                raise CheckpointError(f"{file}: its tensors are not this model's shards (another model or setup?)")
            with torch.no_grad():
                for n, t in weights.items():
                    fsdp.local(own[n]).copy_(t)
        for k, o in optimizers.items():
            fsdp.load_optimizer_state(o, mine["optimizers"][k])
        set_rng_state(mine["rng"])
        return state
