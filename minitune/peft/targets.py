"""Which layers a PEFT method adapts, and how it swaps them in: the floor every method file stands on.

    linear_names(model)                    every adaptable linear layer (nn.Linear, 4-bit Linear4bit, or one
                                           already wrapped: a module with a `base_layer`)
    match_targets(model, targets)          PEFT's target_modules rules ("all-linear", a regex, a list of names)
    target_modules_for_config(model, names) the shortest target_modules list that selects exactly `names`
    replace_module(model, name, new)       put `new` where the submodule `name` was
    count_parameters(model)                (trainable, total), PEFT's print_trainable_parameters numbers

It imports no method file, and every method file (lora, qlora, adalora, ...) imports from it.
"""

import re

import torch.nn as nn

from ..quant.linear4bit import Linear4bit
from .adapter_files import AdapterError


def linear_names(model: nn.Module) -> list[str]:
    """Every adaptable linear layer: plain nn.Linear, a 4-bit Linear4bit (QLoRA), or one already
    wrapped by LoRA / AdaLoRA (a module with a `base_layer`), under its name from before the wrapping."""
    inner = (".base_layer", ".lora_A", ".lora_B")
    return [n for n, m in model.named_modules()
            if hasattr(m, "base_layer") or (isinstance(m, (nn.Linear, Linear4bit)) and not n.endswith(inner))]


def match_targets(model: nn.Module, targets, *, source: str = "") -> list[str]:
    """Names of the linear layers `targets` selects, with PEFT's rules.

    targets: "all-linear" (every linear layer but the output head lm_head), a regex string
    (must match the full module name), or a list of names, each matching a module whose name is
    it or ends in "." + it (so "q_proj" hits every layer's q_proj). Every listed name must hit
    something: a typo is an error, not an adapter on fewer layers than intended.
    """
    names = linear_names(model)
    if targets == "all-linear":
        return [n for n in names if n.split(".")[-1] != "lm_head"]
    if isinstance(targets, str):
        hits = [n for n in names if re.fullmatch(targets, n)]
        if not hits:
            raise AdapterError(f"{source}target_modules regex {targets!r} matches no linear layer of the model")
        return hits
    hits = []
    leaves = sorted({n.split(".")[-1] for n in names})
    for t in targets:
        found = [n for n in names if n == t or n.endswith("." + t)]
        if not found:
            raise AdapterError(f"{source}target module {t!r} is not a linear layer of this model "
                               f"(its linear layers are named {leaves})")
        hits += [n for n in found if n not in hits]
    return [n for n in names if n in hits]  # model order


def target_modules_for_config(model: nn.Module, names: list[str]):
    """The shortest target_modules list that selects exactly `names`: leaf names when they do."""
    leaves = sorted({n.split(".")[-1] for n in names})
    return leaves if set(match_targets(model, leaves)) == set(names) else names


def replace_module(model: nn.Module, name: str, new: nn.Module):
    """model.<name> = new, for a dotted `name` ("model.layers.0.self_attn.q_proj")."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each tensor once even if tied, the numbers PEFT's print_trainable_parameters gives."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable, total
