"""What a `finetuning_type` means for a model at training time: the method put on it, what a run
saves, and how LoRA merges away (lessons 06-09; LLaMA-Factory's names).

    apply_finetuning_type   freeze the model, add the method's parameters (+ trainable token rows)
    training_hooks          the method's extra loss term and per-step callback (AdaLoRA)
    save_trained            the final save: the model, or minitune.peft.save_adapter's folder
    merge_and_unload        LoRA / AdaLoRA folded into the weights: an ordinary checkpoint again

Reading an adapter back (`minitune chat/generate --adapter DIR`) needs none of this:
minitune.peft.load_adapter (peft/adapter_io.py) rebuilds every method from its folder alone.
"""

import os
from pathlib import Path

from . import peft
from .peft.adalora import SVDLinear, ranks
from .peft.adapter_io import METHOD_FILE, METHOD_KEYS, METHOD_WEIGHTS  # noqa: F401  (their home is peft)
from .peft.lora import LoRALinear, lora_layers
from .train.checkpoint import save_final
from .train.config import PEFT_TYPES, TrainConfig, TrainConfigError
from .train.trainer import causal_lm_loss


def apply_finetuning_type(model, cfg: TrainConfig, tok=None, total_steps: int | None = None):
    """Freeze `model` and add what cfg.finetuning_type trains (lessons 06-08); returns the model to
    train: the same object (LoRA, AdaLoRA, adapters) or a wrapper around it (prefix, prompt, ptuning).
    With `additional_target` (lora / qlora) the modules it names train whole beside LoRA and are saved
    with the adapter (minitune/peft/modules_to_save.py; a tied head named there gets its own copy).
    With `trainable_tokens` those rows of the embedding (and of a head tied to it) train as well
    (minitune/peft/trainable_tokens.py); token strings are looked up in `tok`, digits are ids.
    total_steps: the optimizer steps the run will take (trainer.planned_steps); AdaLoRA's rank
    schedule is planned over them, so adalora needs it (as PEFT's AdaLoraConfig needs total_step)."""
    model = add_method(model, cfg, tok, total_steps)
    if cfg.additional_targets:  # lora / qlora: whole modules train too (PEFT's modules_to_save)
        try:
            model = peft.apply_modules_to_save(model, cfg.additional_targets, lora_names=list(lora_layers(model)))
        except ValueError as e:
            raise TrainConfigError(f"additional_target: {e}") from None
    if cfg.trainable_tokens:
        emb = model.model.embed_tokens if cfg.additional_targets else None
        if emb is not None and emb.weight.requires_grad:  # PEFT refuses both on one module as well
            raise TrainConfigError("trainable_tokens: the embedding trains whole already (additional_target); "
                                   "drop one of the two")
        model = peft.apply_trainable_tokens(model, peft.token_ids(tok, cfg.trainable_tokens))
    return model


def add_method(model, cfg: TrainConfig, tok=None, total_steps: int | None = None):
    """cfg.finetuning_type's own parameters, on the frozen model (see apply_finetuning_type)."""
    ft = cfg.finetuning_type
    rank = cfg.adalora_init_r if ft == "adalora" else cfg.lora_rank
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * rank  # LLaMA-Factory's default
    if ft in ("lora", "qlora"):  # apply_lora wraps a 4-bit base in QLoRALinear
        return peft.apply_lora(model, cfg.lora_rank, alpha, cfg.lora_dropout, cfg.lora_targets, cfg.use_rslora)
    if ft == "adalora":
        if not total_steps:
            raise ValueError("AdaLoRA plans its rank schedule over the run's steps: pass total_steps "
                             "(trainer.planned_steps of the training data)")
        return peft.apply_adalora(model, peft.AdaLoRAConfig(
            total_step=total_steps, init_r=cfg.adalora_init_r,
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


def training_hooks(model, cfg: TrainConfig) -> dict:
    """Extra `train` arguments of a finetuning_type. AdaLoRA: the orthogonality regulariser joins the
    loss while training (loss_fn), and the rank allocator runs after every optimizer step (after_step)."""
    if cfg.finetuning_type != "adalora":
        return {}
    controller = peft.AdaLoRAController(model)
    weight = cfg.adalora_orth_reg_weight

    def loss_fn(net, batch):
        loss, n = causal_lm_loss(net, batch)
        if not (net.training and weight):
            return loss, n
        reg = peft.orth_regularizer(model, weight)  # the logged training loss includes it, as in PEFT
        return loss + reg, n, {"orth_reg": reg.detach()}

    def after_step(model, step):
        controller.update_and_allocate(model, step)

    return {"loss_fn": loss_fn, "after_step": after_step}


def merge_and_unload(model):
    """Fold every LoRA / AdaLoRA update into its base weight and put the plain nn.Linear back, so the
    model saves as an ordinary checkpoint (LLaMA-Factory's `export`). Outputs do not change. Whole trained
    modules (modules_to_save) need nothing: they trained in place, so they are the model's weights already."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (LoRALinear, SVDLinear)):
            m.merge()  # W0 += the layer's delta_weight()
            peft.replace_module(model, name, m.base_layer)
    return peft.unload_trainable_tokens(model, merge=True)  # E[i_j] += delta[j]: trained token rows into the weights


def save_trained(model, tok, cfg: TrainConfig) -> str:
    """The final save into output_dir (beside the log and checkpoints); returns what was written.

    full: the model. lora / adalora: the adapter in PEFT's layout (peft.PeftModel.from_pretrained reads it,
    so does `--adapter`), and with export_dir also the merged model. Adapters and soft prompts: their
    trainable tensors plus a small JSON of the settings, which `--adapter` reads back. The files are
    minitune.peft.save_adapter's (peft/adapter_io.py)."""
    out = Path(cfg.output_dir)
    ft = cfg.finetuning_type
    if ft not in PEFT_TYPES:
        save_final(model, tok, out)
        return f"model saved to {out}"
    tmp = out / f".adapter.tmp-{os.getpid()}"
    settings = None
    if ft in METHOD_KEYS:
        settings = {k: getattr(cfg, k) for k in METHOD_KEYS[ft]}
        if "num_virtual_tokens" in settings:
            settings["num_virtual_tokens"] = cfg.virtual_tokens
    # it replaces its folder whole: not output_dir itself
    peft.save_adapter(model, tmp, cfg.model_name_or_path, method=ft if ft in METHOD_KEYS else None, settings=settings)
    tok.save(tmp)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
    what = f"{ft} adapter saved to {out}"
    if getattr(model, "adalora_config", None) is not None and model.adalora_config.rank_pattern:
        kept = ranks(model.adalora_config.rank_pattern)
        what += f" (AdaLoRA ranks kept: {sum(kept.values())} of {cfg.adalora_init_r * len(kept)})"
    if cfg.export_dir:
        save_final(merge_and_unload(model), tok, cfg.export_dir)
        what += f"; merged model exported to {cfg.export_dir}"
    return what

