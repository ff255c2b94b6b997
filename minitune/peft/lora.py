"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen linear layer W0 [out, in] gets a trainable low-rank update:

    h = W0 x + b + s * B A dropout(x),    A [r, in], B [out, r], r << min(in, out)
    s = alpha / r                          (rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r))

A starts Kaiming-uniform (a = sqrt(5), nn.Linear's default, as PEFT does) and B at zero, so
training starts exactly at the base model. Only A and B are trained: r * (in + out) numbers per
layer instead of in * out. After training, B A can be folded into W0 (`merge_lora`) and the
model runs at the base model's speed.

Adapters move both ways with Hugging Face PEFT: our module names are HF's, so PEFT's tensor
`base_model.model.<name>.lora_A.weight` is our `<name>.lora_A.weight`.
"""

import math
import re
from contextlib import contextmanager

import torch
import torch.nn as nn

from .adapter_files import (PEFT_PREFIX, UNSUPPORTED, AdapterError, check_modules, check_shape, check_supported,
                            read_token_rows, split_peft_name)
from .lora_backward import LoRAFunction
from .modules_to_save import add_peft_modules, load_peft_modules, read_peft_modules
from .targets import count_parameters, match_targets, replace_module, target_modules_for_config
from .trainable_tokens import add_peft_rows, load_rows


class LoRALinear(nn.Module):
    """A linear layer plus a trainable low-rank path: y = base_layer(x) + s * B(A(dropout(x))).

    `base_layer` is an nn.Linear, or anything that maps [..., in] -> [..., out] and says its
    in_features / out_features (QLoRA's 4-bit Linear4bit, lesson 09: base_layer(x) dequantizes).

    fast: the one switch between the textbook and the speed. False (the class default) runs the
    equation of exercise 06.1 with autograd. True (what apply_lora sets, so training, the lessons
    and bench/bench_lora.py run it) sends the layer through LoRAFunction (lora_backward.py), the same
    numbers with a hand-written backward, whenever it applies: not merged, no dropout while
    training, no autocast, and a plain float weight W0. tests/test_lora_function.py checks the two agree.
    """

    fast: bool = False
    adapter_dtype: torch.dtype | None = None  # None: A and B in the base weight's dtype

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 fast: bool | None = None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r  # s, what multiplies B A
        if fast is not None:  # LoRAFunction needs a float W0: never on for a 4-bit base
            self.fast = fast and isinstance(base_layer, nn.Linear)
        w = next(base_layer.parameters(), None)
        w = w if w is not None else next(base_layer.buffers())
        dtype = self.adapter_dtype or w.dtype
        # nn.Linear submodules so the state-dict names end in `.lora_A.weight` exactly as PEFT's
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # no parameters: PEFT's names kept
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """s * B A: the [out, in] update this layer adds to W0."""
        # BEGIN EXERCISE 06.2: the LoRA update s B A (what merging adds to W0)
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        # END EXERCISE

    def forward(self, x):  # x [..., in] -> [..., out]
        if self.fast and self.fast_applies(x):
            return self.fast_forward(x)
        # BEGIN EXERCISE 06.1: LoRA forward
        if self.merged:  # W0 already holds s B A
            return self.base_layer(x)
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        # END EXERCISE

    def fast_applies(self, x) -> bool:
        """LoRAFunction computes base_layer(x) + s B A x with a float W0: not merged (W0 holds s B A then),
        no dropout to feed A another input than W0, no autocast to cast each matmul's inputs."""
        return (isinstance(self.base_layer, nn.Linear) and not self.merged and not (self.dropout and self.training)
                and not torch.is_autocast_enabled(x.device.type))

    def fast_forward(self, x):
        """The same numbers as the equation, with LoRAFunction's hand-written backward: fewer passes over wide tensors."""
        base = self.base_layer
        y = LoRAFunction.apply(x.reshape(-1, x.shape[-1]), base.weight, base.bias, self.lora_A.weight,
                               self.lora_B.weight, self.scaling)
        return y.view(*x.shape[:-1], y.shape[-1])

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout}, fast={self.fast}"


# base-layer type -> the LoRA layer that wraps it; QLoRA (qlora.py) adds Linear4bit -> QLoRALinear, as PEFT's
# dispatchers pick a bitsandbytes LoRA layer for a 4-bit base. The first isinstance match wins; else LoRALinear.
LAYER_FOR_BASE: dict[type, type] = {}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets=("q_proj", "v_proj"), use_rslora: bool = False, fast: bool = True) -> nn.Module:
    """Wrap the target linear layers in LoRALinear and freeze everything but lora_A / lora_B.
    fast: LoRALinear.fast, LoRAFunction's hand-written backward where it applies (same numbers)."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; load or apply one adapter per model")
    if r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
    targets = targets if isinstance(targets, str) else list(targets)
    names = match_targets(model, targets)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and "lm_head" in names:
        raise ValueError("lm_head shares its weight with embed_tokens (tie_word_embeddings); "
                         "merging LoRA into it would change the embeddings too, so minitune refuses to target it")
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        wrapper = next((w for kind, w in LAYER_FOR_BASE.items() if isinstance(base, kind)), LoRALinear)
        replace_module(model, name, wrapper(base, r, alpha, dropout, use_rslora, fast=fast))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """W0 <- W0 + s B A in every LoRA layer: same outputs, no extra matmuls at inference."""
    for m in lora_layers(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """W0 <- W0 - s B A: back to the frozen base weight (exact up to float rounding)."""
    for m in lora_layers(model).values():
        m.unmerge()
    return model


@contextmanager
def disable_lora(model: nn.Module):
    """Inside the block `model` computes as its base model; the adapters are back afterwards.

    RLHF and DPO need a frozen reference policy pi_ref beside the trained one. With a LoRA actor the
    reference is the same network without the low-rank update, so it costs no second copy of the
    weights: set every layer's scale s to 0 (merged layers are unmerged first, as their W0 holds s B A).
    """
    layers = list(lora_layers(model).values())
    saved = [(m, m.scaling, m.merged) for m in layers]
    try:
        for m in layers:
            m.unmerge()  # uses the current scaling, so before zeroing it
            m.scaling = 0.0
        yield model
    finally:
        for m, scaling, merged in saved:
            m.scaling = scaling
            if merged:
                m.merge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: {"<module>.lora_A.weight": [r, in], "<module>.lora_B.weight": [out, r]}."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def print_trainable_parameters(model: nn.Module):
    """A table of the trainable tensors, grouped by name with the layer index dropped, then PEFT's line."""
    rows = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = re.sub(r"\.\d+\.", ".N.", name)
            count, shape, _ = rows.get(key, (0, tuple(p.shape), 0))
            rows[key] = (count + 1, shape, p.numel())
    width = max([len(k) for k in rows] + [9])
    print(f"{'parameter':<{width}}  {'layers':>6}  {'shape':>12}  {'numbers':>12}")
    for key, (count, shape, numel) in rows.items():
        print(f"{key:<{width}}  {count:>6}  {'x'.join(map(str, shape)):>12}  {count * numel:>12,}")
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def to_peft(model: nn.Module, base_model_name_or_path: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The LoRA adapter as PEFT's (adapter_config.json, tensors); adapter_io.save_adapter writes them."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save (call apply_lora or load_adapter first)")
    settings = {(m.r, m.alpha, m.dropout, m.use_rslora) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers with different (r, alpha, dropout, use_rslora) {sorted(settings)}: "
                         "PEFT's config holds one setting")
    r, alpha, dropout, use_rslora = settings.pop()
    if any(m.merged for m in layers.values()):
        raise ValueError("LoRA is merged into the base weights; unmerge_lora(model) before saving the adapter")
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                  use_rslora=use_rslora, target_modules=target_modules_for_config(model, list(layers)),
                  bias="none", fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
                  modules_to_save=None, rank_pattern={}, alpha_pattern={}, use_dora=False, lora_bias=False,
                  base_model_name_or_path=base_model_name_or_path)
    tensors = {PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items()}
    add_peft_rows(model, config, tensors)  # trainable token rows, if any: trainable_token_indices + their rows
    add_peft_modules(model, config, tensors)  # whole trained modules, if any: modules_to_save + their tensors
    return config, tensors


def from_peft(model: nn.Module, cfg_file, config: dict, w_file, tensors: dict) -> nn.Module:
    """Apply LoRA from a PEFT LoRA folder's config (read by adapter_io.load_adapter), then load its
    tensors; everything is checked against the model before anything is changed."""
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {config.get('peft_type')!r} is not a LoRA adapter")
    check_supported(cfg_file, config, UNSUPPORTED)
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    targets = config.get("target_modules")
    if targets is None:
        raise AdapterError(f"{cfg_file}: no target_modules")
    names = match_targets(model, targets, source=f"{cfg_file}: ")
    tokens = read_token_rows(model, cfg_file, config, w_file, tensors)
    try:  # modules_to_save: whole modules' tensors, taken out of `tensors` (modules_to_save.py)
        modules = read_peft_modules(model, config, tensors, lora_names=names)
    except ValueError as e:
        raise AdapterError(f"{cfg_file} / {w_file.name}: {e}") from None
    by_module = {}
    for key, t in tensors.items():
        module, part = split_peft_name(w_file, key, ("lora_A.weight", "lora_B.weight"))
        by_module.setdefault(module, {})[part] = (key, t)
    check_modules(model, names, by_module, cfg_file, w_file)
    for name in names:
        base = model.get_submodule(name)
        parts = by_module[name]
        for part in ("lora_A.weight", "lora_B.weight"):
            if part not in parts:
                raise AdapterError(f"{w_file}: {PEFT_PREFIX}{name}.{part} is missing")
        (ka, a), (kb, b) = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.dim() != 2 or a.shape[0] != r:
            raise AdapterError(f"{w_file}: tensor {ka!r} has shape {list(a.shape)}, but {cfg_file.name} says r={r}")
        check_shape(w_file, ka, a.shape, (r, base.in_features), f"{name} (in_features={base.in_features})")
        check_shape(w_file, kb, b.shape, (base.out_features, r), f"{name} (out_features={base.out_features})")
    apply_lora(model, r, alpha, config.get("lora_dropout", 0.0), targets, config.get("use_rslora", False))
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            layer.lora_A.weight.copy_(by_module[name]["lora_A.weight"][1])
            layer.lora_B.weight.copy_(by_module[name]["lora_B.weight"][1])
    if tokens is not None:
        load_rows(model, *tokens)
    if modules is not None:
        load_peft_modules(model, *modules, lora_names=names)
    return model
