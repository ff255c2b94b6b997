"""Hugging Face checkpoint folders in and out: config.json + safetensors (+ tokenizer files).

Loading builds the model on the `meta` device (shapes only, no memory), then streams the
checkpoint one tensor at a time: read it from the memory-mapped safetensors file, cast it to the
requested dtype, move it to the device, and put it in place. So host memory peaks near one copy of
the checkpoint in the target dtype, never at an extra fp32 copy of the whole model.

Saving writes everything into a temporary folder beside the target and renames it at the end,
so a crash half-way leaves the old checkpoint (or nothing), never half a new one.
"""

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .rope import rope_inv_freq
from .transformer import Transformer

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Buffers some older checkpoints store although they are recomputed from the config.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and the tensor."""


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards listed by the index."""
    if (path / INDEX_FILE).exists():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: not a valid safetensors index ({e!r})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{path / INDEX_FILE} lists shard {f.name}, which does not exist")
        return files
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found (folder holds {present}); "
                          "minitune reads safetensors checkpoints only")


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor):
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


def load_model(path, device="cpu", dtype: torch.dtype | str | None = None) -> Transformer:
    """Build the Transformer described by path/config.json and fill it from the safetensors files.

    dtype=None keeps the checkpoint's dtype (config `torch_dtype`/`dtype`, else the stored tensors').
    """
    path = Path(path)
    cfg = ModelConfig.from_file(path / "config.json")
    files = weight_files(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loaded, unexpected = set(), []
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except SafetensorError as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
        with handle:
            for key in handle.keys():
                if key.endswith(IGNORED_SUFFIXES):
                    continue
                if key not in expected:
                    unexpected.append(key)
                    continue
                t = handle.get_tensor(key)  # one tensor in host memory at a time
                if tuple(t.shape) != expected[key]:
                    raise CheckpointError(f"{f}: tensor {key} has shape {tuple(t.shape)}, but the model built "
                                          f"from config.json expects {expected[key]}")
                if dtype is None and t.is_floating_point():
                    dtype = cfg.dtype or t.dtype
                _set_tensor(model, key, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
                loaded.add(key)
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} tensors the {cfg.architecture} model has no place for, "
                              f"e.g. {unexpected[:5]} (does config.json match the weights?)")
    if cfg.tie_word_embeddings:
        loaded.add("lm_head.weight")  # shares the embedding; the file need not store it
        model.tie_weights()
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing from {[f.name for f in files]}, "
                              f"e.g. {missing[:5]} with shapes {[expected[m] for m in missing[:5]]}")
    model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    model.config.torch_dtype = str(dtype).replace("torch.", "")
    return model.eval()


def _shards(state: dict, max_shard_bytes: int) -> list[dict]:
    shards, current, size = [], {}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    return shards + [current]


def save_pretrained(model: Transformer, tokenizer, out_dir, max_shard_size: int = 5 * 2**30):
    """Write a checkpoint folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Shards past `max_shard_size` bytes into model-0000i-of-0000n.safetensors plus an index.
    """
    out_dir = Path(out_dir)
    cfg = model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # safetensors refuses shared tensors; the config re-ties them
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards = _shards(state, max_shard_size)
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        config = cfg.to_hf_dict()
        config["torch_dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        # the swap: old folder aside, new folder in, old folder gone
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
