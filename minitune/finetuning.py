"""What a `finetuning_type` means for a model: the method put on it, what a run saves, how `--adapter`
puts it back, and how LoRA merges away (lessons 06-09; LLaMA-Factory's names).

    apply_finetuning_type   freeze the model, add the method's parameters (+ trainable token rows)
    training_hooks          the method's extra loss term and per-step callback (AdaLoRA)
    save_trained            the final save: the model, a PEFT adapter folder, or minitune's two files
    attach_adapter          the inverse, for `minitune chat/generate --adapter DIR`
    merge_and_unload        LoRA / AdaLoRA folded into the weights: an ordinary checkpoint again
"""

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import UserError
from .model.checkpoint import save_safetensors
from .train.config import PEFT_TYPES, TrainConfig

# adapters and soft prompts have no PEFT file layout here: their trainable tensors go in these two files
METHOD_FILE, METHOD_WEIGHTS = "minitune_adapter.json", "minitune_adapter.safetensors"
METHOD_KEYS = {"adapter": ("adapter_bottleneck", "adapter_mode"),
               "prefix": ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size"),
               "prompt": ("num_virtual_tokens",),
               "ptuning": ("num_virtual_tokens", "encoder_reparameterization_type", "encoder_hidden_size")}


def apply_finetuning_type(model, cfg: TrainConfig, tok=None):
    """Freeze `model` and add what cfg.finetuning_type trains (lessons 06-08); returns the model to
    train: the same object (LoRA, AdaLoRA, adapters) or a wrapper around it (prefix, prompt, ptuning).
    With `trainable_tokens` those rows of the embedding (and of a head tied to it) train as well
    (minitune/peft/trainable_tokens.py); token strings are looked up in `tok`, digits are ids."""
    from . import peft

    model = add_method(model, cfg, tok)
    if cfg.trainable_tokens:
        model = peft.apply_trainable_tokens(model, peft.token_ids(tok, cfg.trainable_tokens))
    return model


def add_method(model, cfg: TrainConfig, tok=None):
    """cfg.finetuning_type's own parameters, on the frozen model (see apply_finetuning_type)."""
    from . import peft

    ft = cfg.finetuning_type
    rank = cfg.adalora_init_r if ft == "adalora" else cfg.lora_rank
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * rank  # LLaMA-Factory's default
    if ft in ("lora", "qlora"):  # apply_lora wraps a 4-bit base in QLoRALinear
        return peft.apply_lora(model, cfg.lora_rank, alpha, cfg.lora_dropout, cfg.lora_targets, cfg.use_rslora)
    if ft == "adalora":  # total_step is known only once the data is: training_hooks sets it
        return peft.apply_adalora(model, peft.AdaLoRAConfig(
            total_step=cfg.adalora_tinit + cfg.adalora_tfinal + 1, init_r=cfg.adalora_init_r,
            target_r=cfg.adalora_target_r, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, tinit=cfg.adalora_tinit,
            tfinal=cfg.adalora_tfinal, deltaT=cfg.adalora_deltaT, orth_reg_weight=cfg.adalora_orth_reg_weight,
            targets=cfg.lora_targets))
    if ft == "adapter":
        return peft.apply_adapters(model, cfg.adapter_bottleneck, cfg.adapter_mode)
    if ft == "prefix":
        return peft.PrefixTuningModel(model, cfg.virtual_tokens, cfg.prefix_projection, cfg.encoder_hidden_size)
    if ft == "prompt":
        text = cfg.prompt_tuning_init_text
        return peft.PromptTuningModel(model, cfg.virtual_tokens, "text" if text else "random", text, tok)
    if ft == "ptuning":
        return peft.PTuningModel(model, cfg.virtual_tokens, cfg.encoder_reparameterization_type.lower(),
                                 cfg.encoder_hidden_size)
    return model


def training_hooks(model, cfg: TrainConfig, n_train: int) -> dict:
    """Extra `train` arguments of a finetuning_type. AdaLoRA: the orthogonality regulariser joins the
    loss while training (loss_fn), and the rank allocator runs after every optimizer step (after_step)."""
    if cfg.finetuning_type != "adalora":
        return {}
    from .peft import AdaLoRAController, orth_regularizer
    from .train import distributed
    from .train.trainer import causal_lm_loss, planned_steps

    total = planned_steps(n_train, cfg, distributed.world()[1])
    try:
        model.adalora_config = dataclasses.replace(model.adalora_config, total_step=total)
    except ValueError as e:
        raise UserError(f"AdaLoRA over {total} training steps: {e}") from None
    controller = AdaLoRAController(model)
    weight = cfg.adalora_orth_reg_weight

    def loss_fn(net, batch):
        loss, n = causal_lm_loss(net, batch)
        if not (net.training and weight):
            return loss, n
        reg = orth_regularizer(model, weight)  # the logged training loss includes it, as in PEFT
        return loss + reg, n, {"orth_reg": reg.detach()}

    def after_step(model, step):
        controller.update_and_allocate(model, step)

    return {"loss_fn": loss_fn, "after_step": after_step}


def merge_and_unload(model):
    """Fold every LoRA / AdaLoRA update into its base weight and put the plain nn.Linear back, so the
    model saves as an ordinary checkpoint (LLaMA-Factory's `export`). Outputs do not change."""
    from .peft.adalora import SVDLinear
    from .peft.lora import LoRALinear, _replace
    from .peft.trainable_tokens import unload_trainable_tokens

    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
        elif isinstance(m, SVDLinear):  # W0 += alpha / ranknum * P diag(Λ) Q, the same epsilon as its forward
            with torch.no_grad():
                delta = m.lora_B @ (m.lora_A * m.lora_E) * (m.scaling / (m.ranknum + 1e-5))
                m.base_layer.weight += delta.to(m.base_layer.weight.dtype)
        else:
            continue
        _replace(model, name, m.base_layer)
    return unload_trainable_tokens(model, merge=True)  # E[i_j] += delta[j]: trained token rows into the weights


def save_trained(model, tok, cfg: TrainConfig) -> str:
    """The final save into output_dir (beside the log and checkpoints); returns what was written.

    full: the model. lora / adalora: the adapter in PEFT's layout (peft.PeftModel.from_pretrained reads it,
    so does `--adapter`), and with export_dir also the merged model. Adapters and soft prompts: their
    trainable tensors plus a small JSON of the settings, which `--adapter` reads back."""
    from .peft import save_adapter
    from .peft.trainable_tokens import trainable_tokens_layer
    from .train.checkpoint import save_final, trainable_state

    out = Path(cfg.output_dir)
    ft = cfg.finetuning_type
    if ft not in PEFT_TYPES:
        save_final(model, tok, out)
        return f"model saved to {out}"
    tmp = out / f".adapter.tmp-{os.getpid()}"
    if ft in ("lora", "qlora", "adalora"):
        save_adapter(model, tmp, cfg.model_name_or_path)  # it replaces its folder whole: not output_dir itself
    else:
        tmp.mkdir(parents=True)
        save_safetensors(trainable_state(model), tmp / METHOD_WEIGHTS)
        settings = {k: getattr(cfg, k) for k in METHOD_KEYS[ft]}
        if "num_virtual_tokens" in settings:
            settings["num_virtual_tokens"] = cfg.virtual_tokens
        rows = trainable_tokens_layer(model)
        if rows is not None:  # ids, so reading it back needs no tokenizer (PEFT's key name)
            settings["trainable_token_indices"] = rows.token_indices.tolist()
        (tmp / METHOD_FILE).write_text(json.dumps(dict(finetuning_type=ft, base_model_name_or_path=
                                                       cfg.model_name_or_path, **settings), indent=2))
    tok.save(tmp)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
    what = f"{ft} adapter saved to {out}"
    if getattr(model, "adalora_config", None) is not None and model.adalora_config.rank_pattern:
        from .peft.adalora import ranks

        kept = ranks(model.adalora_config.rank_pattern)
        what += f" (AdaLoRA ranks kept: {sum(kept.values())} of {cfg.adalora_init_r * len(kept)})"
    if cfg.export_dir:
        save_final(merge_and_unload(model), tok, cfg.export_dir)
        what += f"; merged model exported to {cfg.export_dir}"
    return what


def attach_adapter(model, adapter_dir):
    """Put the trained adapter in `adapter_dir` onto `model`; returns the model (a wrapper for soft prompts).

    A PEFT folder (adapter_config.json: LoRA or AdaLoRA, made by minitune or by PEFT) goes through
    minitune.peft.load_adapter; a folder `minitune train` wrote for adapter / prefix / prompt / ptuning
    is rebuilt from its settings and its tensors loaded, every name and shape checked. Trainable token
    rows come back with either (PEFT's trainable_token_indices; the minitune file's key of that name).
    """
    from .peft import AdapterError, load_adapter

    path = Path(adapter_dir)
    try:
        if not (path / METHOD_FILE).exists():
            return load_adapter(model, path)
        settings = json.loads((path / METHOD_FILE).read_text())
        ft = settings.get("finetuning_type")
        if ft not in METHOD_KEYS:
            raise AdapterError(f"{path / METHOD_FILE}: finetuning_type {ft!r} is not one of {sorted(METHOD_KEYS)}")
        from safetensors.torch import load_file

        rows = settings.get("trainable_token_indices")
        cfg = TrainConfig(finetuning_type=ft, **{k: settings[k] for k in METHOD_KEYS[ft] if k in settings},
                          trainable_tokens=",".join(map(str, rows)) if rows else None)
        model = apply_finetuning_type(model, cfg)
        tensors = load_file(path / METHOD_WEIGHTS)
        want = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(tensors) != set(want):
            raise AdapterError(f"{path / METHOD_WEIGHTS}: tensors {sorted(set(tensors) ^ set(want))[:4]} do not "
                               f"match the {ft} parameters this model gets (adapter made for a different model?)")
        with torch.no_grad():
            for name, t in tensors.items():
                if t.shape != want[name].shape:
                    raise AdapterError(f"{path / METHOD_WEIGHTS}: {name} has shape {list(t.shape)}, "
                                       f"this model needs {list(want[name].shape)}")
                want[name].copy_(t)
        return model
    except (ValueError, FileNotFoundError, SafetensorError) as e:  # AdapterError is a ValueError
        raise UserError(f"--adapter {adapter_dir}: {e}") from None
