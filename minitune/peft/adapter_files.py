"""PEFT's adapter folder, read and written: what LoRA (lora.py) and AdaLoRA (adalora.py) share.

    adapter_config.json          peft_type, r, lora_alpha, target_modules, ... (PEFT's LoraConfig fields)
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in], ....lora_B.weight [out, r]

The tensor names are PEFT's: `base_model.model.` (PeftModel -> LoraModel -> the transformers model)
followed by the module's name, which is the same in minitune and in transformers. Reading checks
everything against the model before anything changes, and each error names the file and the
tensor: an adapter that does not fit is a clear error, never a silent partial load.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..atomic import atomic_dir
from ..errors import UserError
from ..model.checkpoint import save_safetensors
from .trainable_tokens import read_peft_rows

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


class AdapterError(UserError):
    """An adapter folder that does not fit the model; the message names the file and the tensor."""


def write_adapter_dir(out_dir, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """adapter_config.json + adapter_model.safetensors, written atomically (minitune.atomic), so a
    crash never leaves half an adapter behind."""
    with atomic_dir(out_dir) as tmp:
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS_FILE,
                         metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(out_dir)


def read_adapter_dir(path) -> tuple[Path, dict, Path, dict[str, torch.Tensor]]:
    """(config file, config, weights file, tensors with PEFT's names) of an adapter folder."""
    path = Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, w_file):
        if not f.exists():
            present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            raise AdapterError(f"{f}: not found (folder holds {present})")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise AdapterError(f"{cfg_file}: not UTF-8 text (byte {e.start}; JSON files are UTF-8)") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_file}: holds {json.dumps(config)[:40]} (expected a JSON object of adapter settings)")
    try:
        with safe_open(str(w_file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:  # the library checks the whole header; its message names no file
        raise AdapterError(f"{w_file}: damaged or not a safetensors file ({e})") from None
    return cfg_file, config, w_file, tensors


# config fields minitune cannot honour: loading would silently give a different model (modules_to_save is
# honoured by LoRA: modules_to_save.py)
UNSUPPORTED = dict(use_dora=False, lora_bias=False, fan_in_fan_out=False, rank_pattern={},
                   alpha_pattern={}, layers_to_transform=None, exclude_modules=None, layer_replication=None,
                   target_parameters=None, alora_invocation_tokens=None)


def check_supported(cfg_file: Path, config: dict, fields: dict):
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_file}: bias={config['bias']!r} is not supported (minitune trains no biases)")
    for key, ok in fields.items():
        if config.get(key, ok) not in (ok, None, {}, [], False):
            raise AdapterError(f"{cfg_file}: {key}={config[key]!r} is not supported by minitune")


def split_peft_name(w_file: Path, key: str, suffixes: tuple[str, ...]) -> tuple[str, str]:
    """'base_model.model.<module>.lora_A.weight' -> ('<module>', 'lora_A.weight')."""
    for s in suffixes:
        if key.startswith(PEFT_PREFIX) and key.endswith("." + s):
            return key[len(PEFT_PREFIX):-len(s) - 1], s
    raise AdapterError(f"{w_file}: unexpected tensor {key!r} (expected {PEFT_PREFIX}<module>.{{{', '.join(suffixes)}}})")


def check_modules(model, names: list[str], by_module: dict, cfg_file: Path, w_file: Path):
    """The adapter's tensors and the modules its config targets must be the same set: no partial loads."""
    missing = [n for n in names if n not in by_module]
    extra = [n for n in by_module if n not in names]
    if missing:
        raise AdapterError(f"{w_file}: no adapter tensors for {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                           f"which {cfg_file.name} targets")
    if extra:
        raise AdapterError(f"{w_file}: tensors for {extra[:4]} which {cfg_file.name}'s target_modules do not "
                           "select in this model (adapter made for a different model?)")


def check_shape(w_file: Path, key: str, got, want, what: str):
    if tuple(got) != tuple(want):
        raise AdapterError(f"{w_file}: tensor {key!r} has shape {list(got)}, but {what} needs {list(want)}")


def read_token_rows(model, cfg_file: Path, config: dict, w_file: Path, tensors: dict):
    """trainable_token_indices and their rows (minitune.peft.trainable_tokens), checked and taken out of
    `tensors`; None when the adapter has none."""
    try:
        return read_peft_rows(model, config, tensors)
    except ValueError as e:
        raise AdapterError(f"{cfg_file} / {w_file.name}: {e}") from None
