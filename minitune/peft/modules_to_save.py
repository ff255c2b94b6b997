"""Modules to save (整模块训练): whole modules trained beside LoRA, and saved with the adapter.

LoRA adds a low-rank update to chosen linear layers and freezes everything else. Some modules want
more than that: a new special token needs its own row of the embedding E [V, d] and of the LM head,
which no low-rank update of the attention layers can give it. So a few named modules are trained
in full, beside the LoRA layers:

    for each module m named:   every parameter W_m of m trains, starting from the base's value
    every other weight:        as LoRA leaves it (W0 frozen; A and B trainable)
    adapter file:              LoRA's A and B, plus each W_m whole (V * d numbers for a head)

This is PEFT's `modules_to_save` (a field of LoraConfig) and LLaMA-Factory's `additional_target`
(`additional_target: embed_tokens,lm_head`, what it also sets when it adds special tokens). A name
selects every module whose full name ends with it, PEFT's rule (a plain suffix of the string:
"lm_head" selects `lm_head`, "embed_tokens" selects `model.embed_tokens`). A name selecting nothing,
a module with no weights, and a module that is (or holds, or sits inside) a LoRA layer are errors.

Tied embeddings (tie_word_embeddings: the head multiplies by the embedding matrix itself). PEFT
trains a copy of each named module, so naming `lm_head` unties the pair: the head trains its own
copy of E while the embedding stays the base's; naming both trains two independent copies. The same
here: a named module holding a matrix shared with a module outside it gets its own copy, and the
model's config then says tie_word_embeddings false, so a merged export writes both matrices.

PEFT keeps the original module beside the trained copy, to switch the adapter off. Here the module
trains in place (no second copy but the untying above), so `disable_lora` does not restore it: the
stages whose reference is the actor with LoRA switched off during training (ppo, grpo) refuse
additional_target (train/config.py). dpo / kto compute their reference log-probs before training,
while the modules still hold the base's weights.

PEFT's file layout (0.21): the trained tensors under the module's own name, beside the LoRA tensors,

    base_model.model.lm_head.weight               [V, d]
    base_model.model.model.embed_tokens.weight    [V, d]
    adapter_config.json:  "modules_to_save": ["embed_tokens", "lm_head"]   (the names as given)

and loading copies them over the base's weights. Merging has nothing more to do: they are the weights.

QLoRA: a 4-bit layer holds NF4 codes, not numbers a gradient can move, so a module holding one is
refused (PEFT would copy the frozen 4-bit layer, which bitsandbytes cannot train either). lm_head and
embed_tokens are never quantized (minitune/model/checkpoint.py), so the usual targets work.
"""

import torch
import torch.nn as nn

from ..quant.linear4bit import Linear4bit
from .adapter_files import PEFT_PREFIX

CONFIG_KEY = "modules_to_save"  # PEFT's LoraConfig field


def targets_list(value) -> list[str]:
    """'embed_tokens,lm_head' (LLaMA-Factory's comma list) or a list -> ['embed_tokens', 'lm_head']."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [t.strip() for t in items if isinstance(t, str) and t.strip()]


def inside(name: str, other: str) -> bool:
    """Is module `name` the module `other` or one of its submodules?"""
    return name == other or name.startswith(other + ".")


def match_modules(model: nn.Module, targets: list[str], lora_names=()) -> list[str]:
    """The full names of the modules `targets` select (PEFT's suffix rule), checked; ValueError says why not.
    lora_names: the modules LoRA wraps, which cannot also train whole (their own A and B already train)."""
    names = [n for n, _ in model.named_modules() if n]  # "" is the model itself
    found = []
    for target in targets:
        hits = [n for n in names if n.endswith(target)]
        if not hits:  # the model's own module names, not LoRA's parts nor layer numbers
            top = sorted({n.split(".")[-1] for n in names if not n.split(".")[-1].isdigit()
                          and not any(inside(n, x) and n != x for x in lora_names)})
            raise ValueError(f"{target!r} matches no module of the model (module names end in: {', '.join(top)})")
        found += [n for n in hits if n not in found]
    for n in found:
        outer = next((o for o in found if o != n and inside(n, o)), None)
        if outer is not None:
            raise ValueError(f"{n!r} sits inside {outer!r}, and both are selected; name one of them")
        lora = next((x for x in lora_names if inside(n, x) or inside(x, n)), None)
        if lora is not None:
            raise ValueError(f"{n!r} overlaps the LoRA layer {lora!r}; a module trains whole or through LoRA, "
                             "not both (take it out of lora_target or additional_target)")
        module = model.get_submodule(n)
        if any(isinstance(m, Linear4bit) for m in module.modules()):
            raise ValueError(f"{n!r} holds a 4-bit layer (QLoRA's NF4 base), which cannot train; name a module "
                             "that is not quantized, such as lm_head or embed_tokens")
        if next(module.parameters(), None) is None:
            raise ValueError(f"{n!r} has no weights to train")
    return found


def saved_modules(model: nn.Module) -> list[str]:
    """The full names of the modules `apply_modules_to_save` made trainable ([] when none)."""
    return list(getattr(model, "saved_module_names", []))


def is_tied(model: nn.Module) -> bool:
    """Does the LM head multiply by the embedding matrix itself (tie_word_embeddings)?"""
    head, lm = getattr(model, "lm_head", None), getattr(model, "model", None)
    emb = getattr(lm, "embed_tokens", None)
    return head is not None and emb is not None and head.weight is emb.weight


@torch.no_grad()
def untie(model: nn.Module, name: str):
    """Give module `name` its own copy of any parameter it shares with a module outside it (a tied head
    and embedding), as PEFT's copy of the module has; the config then says the pair is no longer tied."""
    module = model.get_submodule(name)
    outside = {id(p) for n, m in model.named_modules() if not inside(n, name) for p in m.parameters(recurse=False)}
    for sub in module.modules():
        for pname, p in list(sub.named_parameters(recurse=False)):
            if id(p) in outside:
                setattr(sub, pname, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    cfg = getattr(model, "config", None)
    if getattr(cfg, "tie_word_embeddings", False) and not is_tied(model):
        cfg.tie_word_embeddings = False  # two matrices now: a saved checkpoint must hold both


def apply_modules_to_save(model: nn.Module, targets, lora_names=()) -> nn.Module:
    """Make the modules `targets` selects trainable in full (untied first, see the module docstring).
    Call it on the model LoRA was applied to (lora_names: its LoRA layers). Returns `model`."""
    if saved_modules(model):
        raise ValueError(f"the model already trains whole modules {saved_modules(model)}; apply them once")
    targets = targets_list(targets)
    if not targets:
        raise ValueError("give the names of the modules to train, e.g. 'lm_head' or 'embed_tokens,lm_head'")
    names = match_modules(model, targets, lora_names)
    for name in names:
        untie(model, name)
        model.get_submodule(name).requires_grad_(True)
    # plain attributes: what a saved adapter's config lists (as given) and which modules they selected
    model.modules_to_save, model.saved_module_names = targets, names
    return model


# ----------------------------------------------------------------------------- PEFT's file layout


def add_peft_modules(model: nn.Module, config: dict, tensors: dict):
    """Put the whole trained modules into a LoRA adapter's config and tensors, as PEFT saves them."""
    names = saved_modules(model)
    if not names:
        return
    config[CONFIG_KEY] = list(model.modules_to_save)
    for name in names:
        for pname, p in model.get_submodule(name).named_parameters():
            tensors[f"{PEFT_PREFIX}{name}.{pname}"] = p.detach()


def read_peft_modules(model: nn.Module, config: dict, tensors: dict, lora_names=()):
    """A LoRA adapter's (targets, {full tensor name in the model: tensor}), checked against `model` before
    anything changes, and taken out of `tensors`; None when the adapter names no modules_to_save.
    lora_names: the modules the adapter's LoRA layers will wrap. ValueError says what does not fit."""
    targets = config.get(CONFIG_KEY)
    if not targets:
        return None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{CONFIG_KEY} {targets!r} is not a list of module names")
    if config.get("ensure_weight_tying") and is_tied(model):
        raise ValueError("ensure_weight_tying=True (one trained matrix shared by a tied head and embedding) is "
                         "not supported by minitune; it trains a copy of each named module, PEFT's default")
    names = match_modules(model, targets, lora_names)
    found = {}
    for name in names:
        for pname, p in model.get_submodule(name).named_parameters():
            key = f"{PEFT_PREFIX}{name}.{pname}"
            if key not in tensors:
                raise ValueError(f"{CONFIG_KEY} selects {name!r}, but tensor {key!r} is missing")
            t = tensors.pop(key)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"tensor {key!r} has shape {list(t.shape)}, but {name}.{pname} of this model "
                                 f"has {list(p.shape)}")
            found[f"{name}.{pname}"] = t
    return targets, found


@torch.no_grad()
def load_peft_modules(model: nn.Module, targets: list[str], found: dict, lora_names=()) -> nn.Module:
    """apply_modules_to_save, then copy the adapter's tensors (read_peft_modules) over the weights."""
    apply_modules_to_save(model, targets, lora_names)
    for name, t in found.items():
        p = model.get_parameter(name)
        p.copy_(t.to(p))
    return model


def modules_to_save_num_params(model: nn.Module) -> int:
    """Numbers the whole modules train: a Qwen2.5-0.5B head alone is 151,936 x 896 = 136,134,656."""
    return sum(p.numel() for n in saved_modules(model) for p in model.get_submodule(n).parameters())
