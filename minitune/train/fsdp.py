"""Fully sharded data parallelism: ZeRO-3 and ZeRO-2 on PyTorch's FSDP2 (`fully_shard`).

Data parallelism (distributed.py) keeps a whole copy of everything on each of the W processes.
Full fine-tuning with AdamW holds 16 bytes per parameter p (ZeRO, Rajbhandari et al. 2020; memory.py),
so a 7B model needs ~112 GB on every rank, however many ranks there are. ZeRO splits that state
into W shards (分片), and rank r keeps only shard r:

    strategy (HF `fsdp` / DeepSpeed)      weights     gradients    AdamW moments   per rank, fp32
    DDP                                   p           p            2p              16 p
    ZeRO-2  shard_grad_op  (stage 2)      p           p / W        2p / W          4 p + 12 p / W
    ZeRO-3  full_shard     (stage 3)      p / W       p / W        2p / W          16 p / W
    + offload                             the shards live in CPU memory; the device holds one unit at a time

Each transformer block is one FSDP unit, and the embeddings, final norm and head form the root unit.
Per micro-batch, for each unit in turn (Zhao et al. 2023, "PyTorch FSDP"):

    forward:  all-gather the unit's W shards -> its whole weights; compute; free them again
              (ZeRO-3; ZeRO-2 keeps them until backward: reshard_after_forward=False)
    backward: all-gather again (ZeRO-3), compute the gradients, then reduce-scatter them: rank r
              receives the average over the W ranks of shard r only, never the whole gradient
    step:     AdamW updates the local shard with the local moments; no communication

DDP's all-reduce of the gradients costs the same bytes as a reduce-scatter plus an all-gather, so
ZeRO-2 moves no more data than DDP, and ZeRO-3 one all-gather more per step. Each process takes
the same share of every global batch as under DDP, and the losses are DDP's up to float rounding.

FSDP2 turns each parameter into a DTensor: a tensor that knows it is the concatenation, along dim 0,
of W local pieces. `shard_model` shards a *twin* of the model (the same Parameter objects under
new modules) and empties the caller's model; `gather_into` puts the whole trained weights back into
it at the end, so `train(model, ...)` leaves a plain model on every rank, as it does without FSDP.

Checkpoints during training are sharded: every rank writes its own shards and AdamW moments, and
rank 0 renames the folder into place once all have (`save_sharded`); resuming needs the same W.

The option names are Hugging Face TrainingArguments' `fsdp` (space-separated: "full_shard offload");
LLaMA-Factory's `deepspeed: ds_z3_config.json` is read and run as the equivalent FSDP option.

Every stage that trains through the trainer is sharded here: sft, pt, rm (the value head joins the root
unit), dpo, orpo, simpo and kto (their reference log-probs are computed before sharding). PPO and GRPO
have loops of their own; rlhf/sharded.py uses the same shard_model / gather_into for their models.
"""

import copy
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..atomic import atomic_dir
from ..model.checkpoint import CheckpointError, save_safetensors
from ..model.transformer import Block
from . import distributed as dist
from .checkpoint import OPTIM_FILE, SHARD_FILE, STATE_FILE, read_state, read_tensors, rng_state, set_rng_state

# FSDP2 warns when a sharded model's forward returns a view (a reward model's [B] scores are one), because an
# in-place op on it would skip the backward all-gather; no loss here writes into a model's output
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")  # HF's names; auto_wrap: each block, always


@dataclass(frozen=True)
class Sharding:
    reshard_after_forward: bool  # True: ZeRO-3 (weights sharded between uses too); False: ZeRO-2
    offload: bool = False  # shards, gradients and AdamW moments in CPU memory

    def __str__(self) -> str:
        return ("full_shard" if self.reshard_after_forward else "shard_grad_op") + " offload" * self.offload


def parse_fsdp(value: str | list[str] | None) -> Sharding | None:
    """The `fsdp` key ("full_shard", "shard_grad_op offload", or a list of options) -> Sharding, None when
    unset. ValueError (config.py names the source) for an unknown option or one that cannot work."""
    if not value:
        return None
    items = value if isinstance(value, list) else value.replace(",", " ").split()
    unknown = [o for o in items if o not in OPTIONS]
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} (expected full_shard or shard_grad_op, optionally with "
                         "offload, space-separated as in HF TrainingArguments; hybrid_shard and no_shard are not "
                         "implemented)")
    if "full_shard" in items and "shard_grad_op" in items:
        raise ValueError("full_shard and shard_grad_op together; pick one (ZeRO-3 or ZeRO-2)")
    if "full_shard" not in items and "shard_grad_op" not in items:  # HF refuses offload alone too
        raise ValueError(f"{value!r} says how, not what, to shard: add full_shard or shard_grad_op")
    return Sharding(reshard_after_forward="full_shard" in items, offload="offload" in items)


def read_deepspeed(path: str) -> tuple[str | None, str]:
    """A DeepSpeed config file (LLaMA-Factory's examples/deepspeed/ds_z*_config.json) -> (the fsdp option it
    equals, or None for stage 0, i.e. plain DDP; a note saying so). Only zero_optimization.stage and its
    offload_optimizer / offload_param devices are read; ValueError for a file that cannot be used."""
    file = Path(path)
    try:
        ds = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (a DeepSpeed JSON config, e.g. ds_z3_config.json; relative "
                         f"paths start at {os.getcwd()})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({e.__class__.__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    zero = ds.get("zero_optimization", {}) if isinstance(ds, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if stage == 1:
        raise ValueError(f"{path}: ZeRO stage 1 (only the optimizer state sharded) has no FSDP equivalent here; "
                         "use stage 2 (shard_grad_op), which shards the gradients too, or stage 3")
    offload = any(isinstance(zero.get(k), dict) and zero[k].get("device", "none") not in ("none", None)
                  for k in ("offload_optimizer", "offload_param"))
    if stage == 0:
        return None, f"note: deepspeed {path}: ZeRO stage 0 shards nothing; running plain data parallel (DDP)"
    option = ("full_shard" if stage == 3 else "shard_grad_op") + " offload" * offload
    return option, (f"note: deepspeed {path}: ZeRO stage {stage}{' with CPU offload' * offload} runs as "
                    f"fsdp {option!r} on PyTorch FSDP2 (no DeepSpeed needed; its other settings are not read)")


def shard_model(model: nn.Module, sharding: Sharding, bf16: bool, device: torch.device) -> nn.Module:
    """Shard `model` over the process group; returns the sharded twin to train (see the module docstring).

    Each Block is one unit, then the root takes what is left (embeddings, final norm, head: a tied
    head shares the embedding's shards). bf16: compute in bfloat16 on all-gathered bf16 copies while
    the shards (the master weights) and the reduce-scatter stay fp32 (FSDP's MixedPrecisionPolicy).
    `model` keeps its modules but no weights until gather_into (a run that fails half-way leaves it empty)."""
    # deepcopy the modules but not the parameters: the memo maps each one to itself
    twin = copy.deepcopy(model, {id(p): p for p in model.parameters()})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if sharding.offload else OffloadPolicy()
    kw = dict(reshard_after_forward=sharding.reshard_after_forward, mp_policy=mp, offload_policy=offload)
    for m in twin.modules():
        if isinstance(m, Block):
            fully_shard(m, **kw)
    fully_shard(twin, **kw)
    with torch.no_grad():  # the whole weights now live only as shards: free the caller's copy
        for p in model.parameters():
            p.data = p.data.new_empty(0)
    return twin


class ShardedForward(nn.Module):
    """What the loss calls under FSDP: the sharded model's forward, whose hooks all-gather each unit.

    It has no `hidden_states`, so causal_lm_loss takes its plain path (as under DDP): the fused head
    reads lm_head.weight outside any forward, where it is still a shard."""

    def __init__(self, sharded: nn.Module):
        super().__init__()
        self.sharded = sharded

    def forward(self, *args, **kwargs):
        return self.sharded(*args, **kwargs)

    @contextmanager
    def no_sync(self):
        """DDP skips the all-reduce on all but the last micro-batch. FSDP reduce-scatters after every one:
        holding the sum back would mean keeping a whole, unsharded gradient, what ZeRO is there to avoid."""
        yield


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor all-gathered into the whole tensor (a collective: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_into(model: nn.Module, sharded: nn.Module):
    """All-gather every trained weight and put it back into `model`, emptied by shard_model; every rank
    ends with the whole model, ready for save_pretrained / the adapter files on rank 0."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in sharded.named_parameters():  # the same names: the twin is a copy
            # back on the model's own device (offloaded shards live in CPU memory), in its own dtype
            own[name].data = full(p).detach().to(own[name].device, own[name].dtype)


def held_bytes(model: nn.Module, optimizer) -> int:
    """Parameter + optimizer-state bytes this process holds (its shards under FSDP, else everything)."""
    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    states = sum(local(t).numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor))
    return params + states


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with each DTensor moment replaced by this rank's piece (torch.save-able,
    and readable with weights_only=True)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: local(v).clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                   for i, s in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer, sd: dict):
    """The inverse: each local piece becomes a DTensor laid out like its parameter again."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, s in sd["state"].items():
        p = params[i]
        for k, v in s.items():
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.dim() > 0:
                s[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(sd)


@contextmanager
def all_ranks_write(final: Path):
    """with all_ranks_write(out/"checkpoint-4") as tmp: every rank writes its files into tmp, a hidden folder
    (named with rank 0's pid) that rank 0 renames into place once every rank has finished: a crash leaves
    no checkpoint-N that looks complete. Every rank enters together."""
    rank, _ = dist.world()
    pid0 = dist.broadcast_int(os.getpid())
    tmp = final.with_name(f".{final.name}.tmp-{pid0}")  # atomic_dir's hidden name, seen from rank 0

    @contextmanager
    def written():
        dist.barrier()  # rank 0 has made the folder
        yield tmp
        dist.barrier()  # every rank has written

    if rank == 0:
        with atomic_dir(final) as made:
            assert made == tmp
            with written():
                yield tmp
    else:
        with written():
            yield tmp
    dist.barrier()  # renamed into place


def save_sharded(output_dir, step: int, sharded: nn.Module, optimizer, scheduler, scaler, info: dict) -> Path:
    """output_dir/checkpoint-{step}/ written by all ranks (all_ranks_write): rank r's trainable shards and
    AdamW moments in shard-rank{r}-of-{W}.safetensors and optimizer-rank{r}-of-{W}.pt, and rank 0's
    trainer_state.pt."""
    rank, world = dist.world()
    final = Path(output_dir) / f"checkpoint-{step}"
    with all_ranks_write(final) as tmp:
        tensors = {n: local(p).detach().cpu().contiguous() for n, p in sharded.named_parameters() if p.requires_grad}
        save_safetensors(tensors, tmp / SHARD_FILE.format(r=rank, w=world), metadata={"format": "pt"})
        torch.save({"optimizer": optimizer_state(optimizer), "rng": rng_state()},
                   tmp / OPTIM_FILE.format(r=rank, w=world))
        if rank == 0:
            state = {"global_step": step, **info, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "rng": rng_state(), "fsdp_world_size": world}
            torch.save(state, tmp / STATE_FILE)
            (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step, **info, "fsdp_world_size": world},
                                                               indent=2))
    return final


def load_sharded(path, sharded: nn.Module, optimizer, scheduler, scaler) -> dict:
    """Put a sharded checkpoint back on this rank (the same number of ranks that wrote it); returns its info."""
    path = Path(path)
    rank, world = dist.world()
    state = read_state(path / STATE_FILE)
    if state.get("fsdp_world_size") != world:
        wrote = state.get("fsdp_world_size")
        raise CheckpointError(f"{path}: written by {f'{wrote} FSDP processes' if wrote else 'a run without fsdp'}, "
                              f"now {world}; resume with the same fsdp setting and --nproc_per_node")
    weights = read_tensors(path / SHARD_FILE.format(r=rank, w=world))
    mine = read_state(path / OPTIM_FILE.format(r=rank, w=world))
    own = {n: p for n, p in sharded.named_parameters() if p.requires_grad}
    if set(weights) != set(own) or any(weights[n].shape != local(own[n]).shape for n in own):
        raise CheckpointError(f"{path / SHARD_FILE.format(r=rank, w=world)}: its tensors are not this model's shards "
                              "(another model, finetuning_type or LoRA setting?)")
    with torch.no_grad():
        for n, t in weights.items():
            local(own[n]).copy_(t)
    load_optimizer_state(optimizer, mine["optimizer"])
    scheduler.load_state_dict(state.pop("scheduler"))
    scaler.load_state_dict(state.pop("scaler"))
    state.pop("rng")
    set_rng_state(mine["rng"])
    return state
