"""Training checkpoints: everything needed to continue a run as if it had never stopped.

    output_dir/checkpoint-{step}/
        model.safetensors + config.json + tokenizer   (full fine-tuning: a loadable model), or
        trainable_params.safetensors                   (few trainable parameters, e.g. LoRA)
        trainer_state.pt     optimizer moments, scheduler, loss scaler, RNG states, step
        trainer_state.json   the same step/epoch numbers, for humans

Resuming reproduces the uninterrupted run exactly because nothing is left out: the weights in
fp32, AdamW's two moments and step counts, the scheduler position, the fp16 loss scale, the
RNG states (dropout, sampling), and the data position, which is the global step alone since
each epoch's order is a pure function of (seed, epoch).

A checkpoint is first written under a hidden temporary name and renamed into place at the end;
a crash half-way leaves no `checkpoint-N` that looks complete but is not.
"""

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir
from ..model import Transformer, save_pretrained
from ..model.checkpoint import weight_files, write_checkpoint_files

TRAINABLE_FILE, STATE_FILE = "trainable_params.safetensors", "trainer_state.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def saves_full_model(model: nn.Module) -> bool:
    """A whole loadable model when it is a plain Transformer that mostly trains; else only what trains."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return isinstance(model, Transformer) and trainable >= total / 2


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir, step: int, model: nn.Module, tokenizer, optimizer, scheduler, scaler,
                    info: dict) -> Path:
    """Write output_dir/checkpoint-{step}/ atomically; `info` (epoch, ...) goes into the state files."""
    final = Path(output_dir) / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        if saves_full_model(model):
            write_checkpoint_files(model, tokenizer, tmp)
        else:
            save_file(trainable_state(model), tmp / TRAINABLE_FILE, metadata={"format": "pt"})
        state = {"global_step": step, **info, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state()}
        torch.save(state, tmp / STATE_FILE)
        (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step, **info}, indent=2))
    return final


def last_checkpoint(output_dir) -> Path | None:
    """The complete checkpoint with the highest step (temporary folders start with '.')."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / STATE_FILE).exists()]
    return max(found)[1] if found else None


def put_weights(model: nn.Module, weights: dict[str, torch.Tensor], source) -> None:
    """Copy a checkpoint's tensors into the model's parameters of the same names. Each tensor must name
    a parameter of its shape, and every trainable parameter must be there (a frozen base may be left
    out): a checkpoint of another model or setup is an error naming `source`, never a partial load."""
    own = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(own))
    missing = sorted(n for n, p in own.items() if p.requires_grad and n not in weights)
    reshaped = sorted(n for n in set(weights) & set(own) if weights[n].shape != own[n].shape)
    if unknown or missing or reshaped:
        raise ValueError(f"{source}: its tensors are not this model's (written by another model, finetuning_type, "
                         f"LoRA rank or target?): {len(unknown)} the model lacks e.g. {unknown[:2]}, {len(missing)} "
                         f"trainable ones missing e.g. {missing[:2]}, {len(reshaped)} of another shape e.g. "
                         f"{reshaped[:2]}")
    with torch.no_grad():
        for name, t in weights.items():
            own[name].copy_(t)


def load_checkpoint(path, model: nn.Module, optimizer, scheduler, scaler) -> dict:
    """Put a checkpoint's weights and states back in place; returns its info (global_step, ...)."""
    path = Path(path)
    if (path / TRAINABLE_FILE).exists():
        weights = load_file(path / TRAINABLE_FILE)
    else:
        weights = {k: v for f in weight_files(path) for k, v in load_file(f).items()}
    put_weights(model, weights, path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)  # our own file
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    scaler.load_state_dict(state.pop("scaler"))
    set_rng_state(state.pop("rng"))
    return state


def save_final(model: Transformer, tokenizer, output_dir) -> Path:
    """The trained model as a checkpoint folder *inside* output_dir, beside the log and checkpoints.

    save_pretrained swaps whole folders, so we let it write a hidden sibling folder and move its
    files in one by one (each rename is atomic).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f".final.tmp-{os.getpid()}"
    save_pretrained(model, tokenizer, tmp)
    for f in tmp.iterdir():
        f.replace(output_dir / f.name)
    tmp.rmdir()
    return output_dir
