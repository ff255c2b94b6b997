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

Nothing in a checkpoint runs. trainer_state.pt is a pickle, and unpickling can import and call
anything the file names, so it is read with `torch.load(weights_only=True)`, which accepts only
tensors, numbers, strings and containers of them; what we save is made of nothing else (numpy's
RNG state, an ndarray, is stored as a list of ints). A file that names code is refused.

A checkpoint can still be damaged after it was written (a full disk, a copy cut short): resuming
then says which file is damaged and falls back to the checkpoint before it (`resume_checkpoint`).
"""

import json
import pickletools
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm import tqdm

from ..atomic import atomic_dir, hidden_name
from ..model import Transformer, save_pretrained
from ..model.checkpoint import CheckpointError, save_safetensors, weight_files, write_checkpoint_files

TRAINABLE_FILE, STATE_FILE = "trainable_params.safetensors", "trainer_state.pt"
# a sharded checkpoint (train/fsdp.py): each of W ranks writes its shards and its AdamW moments
SHARD_FILE, OPTIM_FILE = "shard-rank{r}-of-{w}.safetensors", "optimizer-rank{r}-of-{w}.pt"


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read back (truncated, overwritten); resuming falls back to an
    earlier checkpoint. The message names the file."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def saves_full_model(model: nn.Module) -> bool:
    """A whole loadable model when it is a plain Transformer that mostly trains; else only what trains."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return isinstance(model, Transformer) and trainable >= total / 2


def rng_state() -> dict:
    """The global RNG states as plain values, so weights_only can read them back: numpy's state is
    ("MT19937", keys as an ndarray, pos, has_gauss, cached_gaussian) and the ndarray becomes a list."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (str(name), keys.tolist(), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
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
            save_safetensors(trainable_state(model), tmp / TRAINABLE_FILE, metadata={"format": "pt"})
        state = {"global_step": step, **info, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state()}
        torch.save(state, tmp / STATE_FILE)
        (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step, **info}, indent=2))
    return final


def checkpoints(output_dir) -> list[Path]:
    """The complete checkpoints in output_dir, newest (highest step) first. Temporary folders start with
    '.', and a folder without trainer_state.pt (written last) is not a checkpoint."""
    if output_dir is None or not Path(output_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found, reverse=True)]


def last_checkpoint(output_dir) -> Path | None:
    """The complete checkpoint with the highest step."""
    found = checkpoints(output_dir)
    return found[0] if found else None


def prune_checkpoints(output_dir, keep: int | None, step: int) -> list[Path]:
    """save_total_limit: right after checkpoint-{step} is saved, delete all but the newest `keep` checkpoint-N
    folders up to it (None: keep all); returns the deleted ones. Folders of a higher step can only be
    damaged ones that resuming skipped: they are left for the run to replace, never counted as the newest."""
    if not keep:
        return []
    folders = sorted((int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
                     if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir() and int(m.group(1)) <= step)
    old = [p for _, p in folders[:-keep]]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; one that cannot be read is a DamagedCheckpointError naming it
    (never safetensors' own error, which names no file)."""
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise DamagedCheckpointError(f"{file}: damaged, cannot be read ({e}; truncated or overwritten?)") from None


def read_state(file: Path) -> dict:
    """trainer_state.pt, read with weights_only=True: tensors, numbers, strings and containers only.

    A file naming code to import and call (a crafted pickle, or a state file of another program) is
    refused before anything in it runs; a file that is merely unreadable is a DamagedCheckpointError."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # random bytes can make the unpickler fail in any way: IndexError, EOFError, ...
        code = code_named(file, e)
        if code:
            raise CheckpointError(f"{file}: refusing to unpickle it: it would import and call {', '.join(code)}; "
                                  "minitune runs no code from a checkpoint (the trainer_state.pt it writes holds "
                                  "only tensors and numbers), so this file was written by something else") from None
        size = file.stat().st_size if file.exists() else 0
        raise DamagedCheckpointError(f"{file}: damaged, cannot be read ({load_error(e)}; {size} bytes: truncated "
                                     "or overwritten?)") from None


def code_named(file: Path, e: Exception) -> list[str]:
    """The functions or classes a pickle that failed to load would import and call; [] when none.
    Found by reading its opcodes: nothing is imported or called."""
    try:  # torch >= 2.5, a file torch.save wrote (a zip archive around data.pkl)
        return torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception:
        pass
    named = re.findall(r"GLOBAL ([\w.]+)", str(e))  # torch 2.4's unpickler names the first one it met
    if named:
        return named
    strings = []  # a bare pickle: GLOBAL "module name", or STACK_GLOBAL after pushing the two strings
    try:
        for op, arg, _ in pickletools.genops(file.read_bytes()):
            if op.name == "GLOBAL":
                named.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                named.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # damaged bytes end the reading: what came before them counts
        pass
    return [n for n in named if re.fullmatch(r"[A-Za-z_][\w.]*", n)]  # names, not random bytes read as one


def load_error(e: Exception) -> str:
    """The informative line of torch.load's long, multi-line messages."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("Unsupported", "Trying to load")):  # the weights-only unpickler's actual complaint
            return ln
    return lines[0].split(". ")[0] if lines else type(e).__name__


def put_weights(model: nn.Module, weights: dict[str, torch.Tensor], source) -> None:
    """Copy a checkpoint's tensors into the model's parameters of the same names. Each tensor must name
    a parameter of its shape, and every trainable parameter must be there (a frozen base may be left
    out): a checkpoint of another model or setup is an error naming `source`, never a partial load."""
    own = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(own))
    missing = sorted(n for n, p in own.items() if p.requires_grad and n not in weights)
    reshaped = sorted(n for n in set(weights) & set(own) if weights[n].shape != own[n].shape)
    if unknown or missing or reshaped:
        raise CheckpointError(f"{source}: its tensors are not this model's (written by another model, "
                              f"finetuning_type, LoRA rank or target?): {len(unknown)} the model lacks e.g. "
                              f"{unknown[:2]}, {len(missing)} trainable ones missing e.g. {missing[:2]}, "
                              f"{len(reshaped)} of another shape e.g. {reshaped[:2]}")
    with torch.no_grad():
        for name, t in weights.items():
            own[name].copy_(t)


def load_checkpoint(path, model: nn.Module, optimizer, scheduler, scaler) -> dict:
    """Put a checkpoint's weights and states back in place; returns its info (global_step, ...).

    Every file is read before anything changes, so a damaged one leaves the model as it was."""
    path = Path(path)
    if any(path.glob(SHARD_FILE.format(r="*", w="*"))):
        raise CheckpointError(f"{path}: a sharded checkpoint (fsdp, one file per process); resume it with the same "
                              "fsdp setting and number of processes (torchrun --nproc_per_node)")
    if (path / TRAINABLE_FILE).exists():
        weights = read_tensors(path / TRAINABLE_FILE)
    else:
        try:
            files = weight_files(path)
        except CheckpointError as e:  # trainer_state.pt is there, the weights are not: an incomplete copy
            raise DamagedCheckpointError(str(e)) from None
        weights = {k: v for f in files for k, v in read_tensors(f).items()}
    state = read_state(path / STATE_FILE)
    put_weights(model, weights, path)
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    scaler.load_state_dict(state.pop("scaler"))
    set_rng_state(state.pop("rng"))
    return state


def resume_checkpoint(output_dir, load):
    """(checkpoint, load(checkpoint)) for the newest checkpoint in output_dir that loads; None when there is none.

    A damaged checkpoint (DamagedCheckpointError: a file cut short or overwritten) is reported and the one
    before it tried. When every checkpoint is damaged, a CheckpointError names the newest damaged file.
    Any other error (a checkpoint of another setup, a file that would run code) stops at once."""
    damaged = None
    for ckpt in checkpoints(output_dir):
        try:
            loaded = load(ckpt)
        except DamagedCheckpointError as e:
            tqdm.write(f"resume: {e}; trying the checkpoint before it")
            damaged = damaged or e
            continue
        if damaged:
            tqdm.write(f"resume: falling back to {ckpt}, the newest checkpoint that is complete")
        return ckpt, loaded
    if damaged:
        raise CheckpointError(f"{damaged}; {output_dir} has no earlier complete checkpoint to fall back to "
                              "(delete its damaged checkpoint-N folders to resume from step 0, or set "
                              "overwrite_output_dir to start afresh)")
    return None


def save_final(model: Transformer, tokenizer, output_dir) -> Path:
    """The trained model as a checkpoint folder *inside* output_dir, beside the log and checkpoints.

    save_pretrained swaps whole folders, so we let it write a hidden sibling folder and move its
    files in one by one (each rename is atomic).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = hidden_name(output_dir / "final", "tmp")  # output_dir/.final.tmp-PID
    save_pretrained(model, tokenizer, tmp)
    for f in tmp.iterdir():
        f.replace(output_dir / f.name)
    tmp.rmdir()
    return output_dir
