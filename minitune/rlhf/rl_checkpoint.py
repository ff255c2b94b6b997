"""RL checkpoints: stop a PPO or GRPO run after a saved step, resume it, get the uninterrupted run.

    output_dir/checkpoint-{step}/
        actor.safetensors    the actor's trainable parameters (the LoRA matrices, or every weight)
        critic.safetensors   the critic's trainable parameters (PPO only)
        trainer_state.pt     each optimizer's state (AdamW's moments and step counts), the KL
                             coefficient, the prompt sampler's generator, the global RNG states,
                             the step, and the records of steps 1..step
        trainer_state.json   the step, for humans

On W processes with fsdp (sharded.py) every rank writes its own pieces instead: actor-rank{r}-of-{W}.safetensors
(and critic-...) with its shards, optimizers-rank{r}-of-{W}.pt with its AdamW moments and RNG states, and rank 0
trainer_state.pt; the folder appears when all have written, and resuming needs the same W.

Why resuming reproduces the uninterrupted run bit for bit: step s of ``ppo_step`` / ``grpo_step``
reads only
  - the trained weights and the optimizers' states (saved, in fp32),
  - the KL coefficient, which the adaptive controller moves after every step (saved),
  - the prompt batch, drawn by a torch.Generator that advances every step (its state: saved),
  - the rollout's sampling seed and the minibatch order, pure functions of (seed, step): nothing to save,
  - dropout, which draws from the global RNGs (python, numpy, torch: saved).
The frozen models (reference, reward) never change, so the caller builds them again as before.
The records are saved too, so the returned list and the JSONL log hold steps 1..N once each.

The helpers and the folder rules are the trainer's (``train/checkpoint.py``): a checkpoint is
written under a hidden temporary name and renamed into place when complete, and ``last_checkpoint``
only sees complete ``checkpoint-N`` folders, so a crash half-way never leaves one that looks whole;
trainer_state.pt is read with weights_only (nothing in it runs); a damaged newest checkpoint is
reported and the one before it resumed from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from ..atomic import atomic_dir
from ..model.checkpoint import CheckpointError, save_safetensors
from ..train.checkpoint import (STATE_FILE, last_checkpoint, put_weights, read_state, read_tensors, resume_checkpoint,
                                rng_state, set_rng_state, trainable_state)

__all__ = ["save_rl_checkpoint", "load_rl_checkpoint", "resume_rl", "last_checkpoint"]


def save_rl_checkpoint(output_dir, step: int, models: dict[str, nn.Module], optimizers: dict,
                       generator: torch.Generator, records: list[dict], kl_ctl=None, dp=None) -> Path:
    """Write output_dir/checkpoint-{step}/ atomically. models / optimizers: {"actor": ..., "critic": ...};
    generator: the prompt sampler's; kl_ctl: PPO's KL controller (None: GRPO, whose beta is fixed).
    dp: on W processes (sharded.py) every rank writes its own shards and AdamW moments instead."""
    final = Path(output_dir) / f"checkpoint-{step}"
    state = {"global_step": step, "kl_coef": None if kl_ctl is None else kl_ctl.value,  # the controller's only moving part
             "generator": generator.get_state(), "records": records}
    if dp is not None:
        dp.save(final, models, optimizers, state)
        return final
    with atomic_dir(final) as tmp:
        for name, model in models.items():
            save_safetensors(trainable_state(model), tmp / f"{name}.safetensors", metadata={"format": "pt"})
        state.update(optimizers={name: opt.state_dict() for name, opt in optimizers.items()}, rng=rng_state())
        torch.save(state, tmp / STATE_FILE)
        (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}, indent=2))
    return final


def read_trainable(file: Path) -> dict[str, torch.Tensor]:
    """One model's tensors of a checkpoint (a DamagedCheckpointError names the file when it cannot be read)."""
    if not file.exists():
        raise CheckpointError(f"{file}: not found; the checkpoint was written by another setup (a GRPO checkpoint "
                              "has no critic) or is not an RL checkpoint")
    return read_tensors(file)


def load_rl_checkpoint(path, models: dict[str, nn.Module], optimizers: dict, generator: torch.Generator,
                       kl_ctl=None, dp=None) -> tuple[int, list[dict]]:
    """Put a checkpoint's weights and states back in place; returns (step, records of steps 1..step).

    Every file is read before anything changes (a damaged one leaves the models as they were).
    Call it after seeding (the global RNG states it restores must win). dp: a sharded checkpoint."""
    path = Path(path)
    if dp is not None:
        state = dp.load(path, models, optimizers)
    else:
        weights = {name: read_trainable(path / f"{name}.safetensors") for name in models}
        state = read_state(path / STATE_FILE)
        if "fsdp_world_size" in state:
            raise CheckpointError(f"{path}: a sharded checkpoint (fsdp, one file per process); resume it with the "
                                  "same fsdp setting and number of processes (torchrun --nproc_per_node)")
        for name, model in models.items():  # a checkpoint of another setup stops here, naming the file
            put_weights(model, weights[name], path / f"{name}.safetensors")
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        set_rng_state(state["rng"])
    if kl_ctl is not None and state["kl_coef"] is not None:
        kl_ctl.value = state["kl_coef"]
    generator.set_state(state["generator"])
    return state["global_step"], state["records"]


def resume_rl(output_dir, models: dict[str, nn.Module], optimizers: dict, generator: torch.Generator,
              kl_ctl=None, dp=None) -> tuple[int, list[dict]]:
    """Load the newest complete checkpoint in output_dir: (step, records); (0, []) when there is none.
    A damaged one is reported and the one before it loaded (train/checkpoint.py, resume_checkpoint)."""
    found = resume_checkpoint(output_dir, lambda c: load_rl_checkpoint(c, models, optimizers, generator, kl_ctl, dp))
    if found is None:  # as the trainer's stages do: say so, then start at step 0
        tqdm.write(f"resume: no checkpoint in {output_dir}, starting from step 0")
        return 0, []
    ckpt, (step, records) = found
    tqdm.write(f"resume: continuing from {ckpt} at step {step}")
    return step, records
