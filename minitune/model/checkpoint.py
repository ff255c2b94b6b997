"""Hugging Face checkpoint folders in and out: config.json + safetensors (+ tokenizer files).

Loading builds the model on the `meta` device (shapes only, no memory), then streams the
checkpoint one tensor at a time: read its bytes from the safetensors file, cast it to the
requested dtype, move it to the device, and put it in place. So host memory peaks near one copy of
the checkpoint in the target dtype, never at an extra fp32 copy of the whole model.

Saving writes everything into a temporary folder beside the target and renames it at the end,
so a crash half-way leaves the old checkpoint (or nothing), never half a new one.
"""

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..atomic import atomic_dir
from ..errors import UserError
from ..quant import Linear4bit
from .config import ModelConfig
from .transformer import Transformer

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Buffers some older checkpoints store although they are recomputed from the config.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(UserError):
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


# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_header_entry(path: Path, name: str, info) -> None:
    """One header entry must be {"dtype": str, "shape": [ints], "data_offsets": [begin, end]}; a
    damaged file would otherwise fail inside arithmetic on its values, naming neither file nor tensor."""
    if not isinstance(info, dict):
        problem, expected = f"is {json.dumps(info)}", 'an object {"dtype", "shape", "data_offsets"}'
    elif not isinstance(info.get("dtype"), str):
        problem, expected = f"has dtype {json.dumps(info.get('dtype'))}", 'a dtype name such as "BF16"'
    elif not (isinstance(info.get("shape"), list) and all(_is_count(d) for d in info["shape"])):
        problem, expected = f"has shape {json.dumps(info.get('shape'))}", "a list of sizes, integers >= 0"
    elif not (isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(_is_count(o) for o in info["data_offsets"])
              and info["data_offsets"][0] <= info["data_offsets"][1]):
        problem, expected = (f"has data_offsets {json.dumps(info.get('data_offsets'))}",
                             "two integers [begin, end], 0 <= begin <= end")
    else:
        return
    raise CheckpointError(f"{path}: damaged or not a safetensors file: tensor {name!r} {problem} (expected {expected})")


def read_header(f, path: Path) -> tuple[dict, int]:
    """A safetensors file is: 8 bytes (little-endian u64) header length N, N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the raw tensor bytes.
    Returns the header and where the data starts; checks every tensor lies inside the file."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if not 0 < n <= size - 8:
        raise CheckpointError(f"{path}: damaged or not a safetensors file: its first 8 bytes give a header of {n} "
                              f"bytes in a file of {size} bytes (expected a header length, a JSON header, the tensors)")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: damaged or not a safetensors file: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged or not a safetensors file: header is {json.dumps(header)[:40]} "
                              "(expected a JSON object of tensors)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        check_header_entry(path, name, info)
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which minitune does not read")
        nbytes = math.prod(info["shape"]) * torch.tensor([], dtype=dtype).element_size()
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name} declares shape {info['shape']} ({nbytes} bytes) "
                                  f"but spans {end - begin} bytes")
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {8 + n + end}, "
                                  f"file has {size} bytes")
    return header, 8 + n


def read_tensor(f, info: dict, data_start: int) -> torch.Tensor:
    """Read one tensor's bytes straight into a fresh CPU tensor: no mmap of the whole file stays
    resident, so host memory holds the model plus one tensor in flight."""
    t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
    f.seek(data_start + info["data_offsets"][0])
    f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return t


def _quantize_linear(model: nn.Module, key: str, blocksize: int = 64):
    """QLoRA loading: swap the nn.Linear owning `key` for a 4-bit layer as soon as its weight
    arrives, so at most one layer is ever held in 16 bits (lesson 09)."""
    module_name = key.rpartition(".")[0]
    parent_name, _, child = module_name.rpartition(".")
    layer = model.get_submodule(module_name)
    if key.endswith(".weight") and isinstance(layer, nn.Linear) and module_name != "lm_head":
        setattr(model.get_submodule(parent_name), child, Linear4bit.from_linear(layer, blocksize, double_quant=True))


def load_model(path, device="cpu", dtype: torch.dtype | str | None = None, quantize: str | None = None) -> Transformer:
    """Build the Transformer described by path/config.json and fill it from the safetensors files.

    dtype=None keeps the checkpoint's dtype (config `torch_dtype`/`dtype`, else the stored tensors').
    quantize="nf4" stores every linear layer but the LM head in NF4 with double quantization
    while loading (QLoRA's frozen base); dtype is then the compute dtype.
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r}: only None or 'nf4' are supported")
    path = Path(path)
    cfg = ModelConfig.from_file(path / "config.json")
    files = weight_files(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    dtype = dtype or cfg.dtype
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loaded, unexpected = set(), []
    for file in files:
        with open(file, "rb") as f:
            header, data_start = read_header(f, file)
            for key, info in header.items():
                if key.endswith(IGNORED_SUFFIXES):
                    continue
                if key not in expected:
                    unexpected.append(key)
                    continue
                if tuple(info["shape"]) != expected[key]:
                    raise CheckpointError(f"{file}: tensor {key} has shape {tuple(info['shape'])}, but the model "
                                          f"built from config.json expects {expected[key]}")
                t = read_tensor(f, info, data_start)
                dtype = dtype or t.dtype
                _set_tensor(model, key, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
                loaded.add(key)
                if quantize:
                    _quantize_linear(model, key)
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
    if quantize:
        model.requires_grad_(False)  # a quantized base is frozen; adapters bring their own parameters
    model.inv_freq = model.inv_freq.to(device)
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


def save_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict | None = None):
    """safetensors' save_file, then the file mode any other file we write gets: 0666 less the umask.

    save_file leaves its file readable by its owner only (mode 0600, seen with safetensors 0.8),
    which breaks a checkpoint folder shared with a group, or served by another user, while its
    config.json beside it is readable by all.
    """
    save_file(tensors, file, metadata=metadata)
    os.chmod(file, 0o666 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read the umask is to set it: put it straight back
    os.umask(mask)
    return mask


def save_pretrained(model: Transformer, tokenizer, out_dir, max_shard_size: int = 5 * 2**30):
    """Write a checkpoint folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Shards past `max_shard_size` bytes into model-0000i-of-0000n.safetensors plus an index.
    """
    with atomic_dir(out_dir) as tmp:
        write_checkpoint_files(model, tokenizer, tmp, max_shard_size)
    return Path(out_dir)


def write_checkpoint_files(model: Transformer, tokenizer, folder: Path, max_shard_size: int = 5 * 2**30):
    """config.json, generation_config.json, the safetensors file(s) and the tokenizer files, into folder."""
    cfg = model.config
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        raise ValueError("save_pretrained: the model holds 4-bit layers; merge/dequantize them to a "
                         "16-bit model first (minitune.quant.dequantize_model), transformers cannot read NF4 buffers")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # safetensors refuses shared tensors; the config re-ties them
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())

    shards = _shards(state, max_shard_size)
    if len(shards) == 1:
        save_safetensors(shards[0], folder / SINGLE_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, folder / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    config = cfg.to_hf_dict()
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k) is not None}
    # keep every stop id the loaded checkpoint had (Qwen2.5-Instruct lists <|endoftext|> beside config.json's eos)
    eos = gen.get("eos_token_id", [])
    eos = eos if isinstance(eos, list) else [eos]
    extra = [i for i in getattr(tokenizer, "stop_ids", []) if i not in eos]
    if extra:
        gen["eos_token_id"] = eos + extra
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save(folder)
