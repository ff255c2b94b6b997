"""Adapter folders, saved and loaded in one place, for every PEFT method.

    save_adapter(model, dir, base_model_name_or_path, method=None, settings=None)
    load_adapter(model, dir) -> the model with its adapter (a wrapper for soft prompts)

The folder says what it holds:

    adapter_config.json + adapter_model.safetensors   PEFT's layout, peft_type LORA or ADALORA (QLoRA is
                                                       LORA over a 4-bit base): lora.py / adalora.py
                                                       turn it into layers; peft.PeftModel reads it too
    minitune_adapter.json + minitune_adapter.safetensors  minitune's own, for adapter / prefix / prompt /
                                                       ptuning (PEFT has no layout for them here): the
                                                       method's settings and its trainable tensors

Trainable token rows come back with either (PEFT's trainable_token_indices; the minitune file's key of
that name), and whole trained modules with a LoRA adapter (PEFT's modules_to_save: modules_to_save.py).
Loading checks every name and shape against the model; a misfit is an AdapterError.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..atomic import atomic_dir
from ..model.checkpoint import save_safetensors
from . import adalora, lora
from .adapter import apply_adapters
from .adapter_files import AdapterError, read_adapter_dir, write_adapter_dir
from .prefix import PrefixTuningModel
from .prompt import PromptTuningModel, PTuningModel
from .trainable_tokens import apply_trainable_tokens, trainable_tokens_layer

# adapters and soft prompts have no PEFT file layout here: their trainable tensors go in these two files
METHOD_FILE, METHOD_WEIGHTS = "minitune_adapter.json", "minitune_adapter.safetensors"
# the settings each method's file holds (TrainConfig's names), enough to rebuild its parameters
METHOD_KEYS = {"adapter": ("adapter_bottleneck", "adapter_mode"),
               "prefix": ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size"),
               "prompt": ("num_virtual_tokens",),
               "ptuning": ("num_virtual_tokens", "encoder_reparameterization_type", "encoder_hidden_size")}
# the defaults of those settings (TrainConfig's), for a file that leaves one out
METHOD_DEFAULTS = dict(adapter_bottleneck=64, adapter_mode="serial", num_virtual_tokens=20, prefix_projection=False,
                       encoder_reparameterization_type="MLP", encoder_hidden_size=None)


def save_adapter(model, out_dir, base_model_name_or_path: str | None = None, method: str | None = None,
                 settings: dict | None = None) -> Path:
    """Write what `model` trains into `out_dir` (replaced whole, atomically).

    LoRA / QLoRA / AdaLoRA layers: PEFT's layout. Otherwise `method` (adapter, prefix, prompt, ptuning)
    and its `settings` (METHOD_KEYS[method]) go in minitune's method file beside the trainable tensors."""
    if lora.lora_layers(model):
        return write_adapter_dir(out_dir, *lora.to_peft(model, base_model_name_or_path))
    if adalora.svd_layers(model) or getattr(model, "adalora_config", None) is not None:
        return write_adapter_dir(out_dir, *adalora.to_peft(model, base_model_name_or_path))
    if method is None:
        raise ValueError("the model has no LoRA layers to save (call apply_lora or load_adapter first)")
    if method not in METHOD_KEYS:
        raise ValueError(f"method {method!r} is not one of {sorted(METHOD_KEYS)}")
    settings = dict(settings or {})
    rows = trainable_tokens_layer(model)
    if rows is not None:  # ids, so reading it back needs no tokenizer (PEFT's key name)
        settings["trainable_token_indices"] = rows.token_indices.tolist()
    state = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_dir(out_dir) as tmp:
        save_safetensors(state, tmp / METHOD_WEIGHTS)
        (tmp / METHOD_FILE).write_text(json.dumps(dict(finetuning_type=method, base_model_name_or_path=
                                                       base_model_name_or_path, **settings), indent=2))
    return Path(out_dir)


def load_adapter(model, path):
    """Put the adapter in folder `path` onto `model`; returns the model (a wrapper for soft prompts)."""
    path = Path(path)
    if (path / METHOD_FILE).exists():
        return load_method_file(model, path)
    cfg_file, config, w_file, tensors = read_adapter_dir(path)
    kind = config.get("peft_type")
    if kind == "LORA":
        return lora.from_peft(model, cfg_file, config, w_file, tensors)
    if kind == "ADALORA":
        if config.get("modules_to_save"):  # whole trained modules are read beside LoRA only (modules_to_save.py)
            raise AdapterError(f"{cfg_file}: modules_to_save={config['modules_to_save']!r} with AdaLoRA is not "
                               "supported by minitune (it reads them in LoRA adapters)")
        return adalora.from_peft(model, cfg_file, config, w_file, tensors)
    raise AdapterError(f"{cfg_file}: peft_type {kind!r} is not a LoRA adapter (minitune reads LORA and ADALORA)")


def add_method(model, method: str, settings: dict):
    """`method`'s trainable parameters on the frozen `model`, from METHOD_KEYS settings."""
    s = {**METHOD_DEFAULTS, **settings}
    model.requires_grad_(False)
    if method == "adapter":
        if s["adapter_mode"] not in ("serial", "parallel"):
            raise AdapterError(f"adapter_mode {s['adapter_mode']!r} is not one of serial, parallel")
        return apply_adapters(model, s["adapter_bottleneck"], s["adapter_mode"])
    if method == "prefix":
        return PrefixTuningModel(model, s["num_virtual_tokens"], s["prefix_projection"], s["encoder_hidden_size"])
    if method == "prompt":
        return PromptTuningModel(model, s["num_virtual_tokens"], "random")  # the file's tensors replace the start
    if method == "ptuning":
        kind = str(s["encoder_reparameterization_type"]).lower()
        if kind not in ("mlp", "lstm"):
            raise AdapterError(f"encoder_reparameterization_type {kind!r} is not one of MLP, LSTM")
        return PTuningModel(model, s["num_virtual_tokens"], kind, s["encoder_hidden_size"])
    raise AdapterError(f"finetuning_type {method!r} is not one of {sorted(METHOD_KEYS)}")


def load_method_file(model, path: Path):
    """Rebuild adapter / prefix / prompt / ptuning from minitune's method file and load its tensors."""
    settings = json.loads((path / METHOD_FILE).read_text())
    method = settings.get("finetuning_type")
    if method not in METHOD_KEYS:
        raise AdapterError(f"{path / METHOD_FILE}: finetuning_type {method!r} is not one of {sorted(METHOD_KEYS)}")
    try:
        model = add_method(model, method, {k: settings[k] for k in METHOD_KEYS[method] if k in settings})
    except AdapterError as e:
        raise AdapterError(f"{path / METHOD_FILE}: {e}") from None
    rows = settings.get("trainable_token_indices")
    if rows:
        model = apply_trainable_tokens(model, [int(i) for i in rows])
    try:
        tensors = load_file(path / METHOD_WEIGHTS)
    except (FileNotFoundError, SafetensorError) as e:
        raise AdapterError(f"{path / METHOD_WEIGHTS}: {e}") from None
    want = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(want):
        raise AdapterError(f"{path / METHOD_WEIGHTS}: tensors {sorted(set(tensors) ^ set(want))[:4]} do not "
                           f"match the {method} parameters this model gets (adapter made for a different model?)")
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != want[name].shape:
                raise AdapterError(f"{path / METHOD_WEIGHTS}: {name} has shape {list(t.shape)}, "
                                   f"this model needs {list(want[name].shape)}")
            want[name].copy_(t)
    return model
