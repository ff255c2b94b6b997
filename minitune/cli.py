"""The command line: `python -m minitune {train,generate,chat,export,eval} ...` (also installed as `minitune`).

    minitune train examples/sft.yaml --learning_rate 1e-4       # like `llamafactory-cli train x.yaml`
    minitune generate --model weights/tiny --template chatml --prompt "Who are you?"
    minitune chat --model saves/sft                              # like `llamafactory-cli chat`
    minitune chat infer.yaml                                     # LLaMA-Factory's inference yaml
    minitune export merge.yaml                                   # like `llamafactory-cli export`: export.py
    minitune eval mmlu.yaml                                      # like `llamafactory-cli eval`: minitune/eval/

Training lives here; what each finetuning_type adds, saves and reads back in finetuning.py;
`generate` and `chat` (streaming, history within the context) in chat.py.
"""

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

import minitune

from . import chat, rlhf  # rlhf.train_ppo / train_grpo looked up when run (tests swap them)
from .data import PaddingCollator, encode_segments, prepare_sft
from .data.dataset import check_cutoff_len
from .data.kto import prepare_kto, read_kto
from .data.pretrain import prepare_pretrain, read_texts  # stage pt: run_pretrain
from .data.registry import load_pair_records, load_sft, normalize_kto, resolve_datasets
from .data.templates import TEMPLATES, get_template
from .errors import UserError
from .eval import EVAL_KEYS, EVAL_NOTED, eval_args, run_eval
from .export import EXPORT_KEYS, EXPORT_NOTED, export
from .finetuning import apply_finetuning_type, save_trained, training_hooks
from .model import ModelConfig
from .rlhf.dpo import train_dpo
from .rlhf.kto import train_kto  # stage kto: run_kto; pref_loss orpo / simpo: run_preference
from .rlhf.orpo import train_orpo
from .rlhf.simpo import train_simpo
from .rlhf.reward import (RewardModel, load_reward_model, prepare_pairs, save_reward_model, save_value_head,
                          train_reward_model)
from .seed import seed_everything
from .tiny.evaluate import stop_ids
from .tiny.tasks import preference_score
from .train import distributed, train
from .train.config import PEFT_TYPES, REFERENCE_FREE, TrainConfig
from .train.fsdp import read_deepspeed
from .train.config_file import FIELDS, coerce, flag_help, load_config, read_config_file
from .train.output_dir import check_output_dir
from .train.plot import plot_log
from .train.trainer import TrainingDiverged, planned_steps

IMPLEMENTED = {("sft", "full")} | {("sft", t) for t in PEFT_TYPES}  # (stage, finetuning_type) pairs this version can train
IMPLEMENTED |= {(stage, t) for stage in ("ppo", "grpo") for t in ("full", "lora")}  # rlhf: run_rl below
IMPLEMENTED |= {("rm", "full"), ("rm", "lora"), ("dpo", "full"), ("dpo", "lora")}  # preference pairs: run_preference below
IMPLEMENTED |= {("kto", "full"), ("kto", "lora")}  # unpaired labelled replies: run_preference below
IMPLEMENTED |= {("pt", "full"), ("pt", "lora"), ("pt", "qlora")}  # raw text: run_pretrain below
RL_UNUSED = ("bf16", "fp16", "lr_scheduler_type", "warmup_ratio", "weight_decay", "val_size", "eval_steps",
             "per_device_eval_batch_size", "logging_steps")  # run_rl reads none of them


# ----------------------------------------------------------------------------- train


def train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="fine-tune a model from a config file and/or flags", allow_abbrev=False,
                       description="Train with a LLaMA-Factory style config (.json or key: value .yaml); "
                                   "flags override the file. Boolean flags alone mean true (--bf16).")
    p.add_argument("config", nargs="?", help="config file (.json, or .yaml with flat key: value lines)")
    helps = flag_help()
    helps["template"] = f"chat template: {', '.join(TEMPLATES)}"
    for name, f in FIELDS.items():
        bool_flag = f.type is bool
        p.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar="BOOL" if bool_flag else name.upper(),
                       nargs="?" if bool_flag else None, const="true" if bool_flag else None,
                       help=f"{helps.get(name, '')} (default: {f.default})")
    return p


def load_for_training(cfg: TrainConfig, tok=None, n_train: int | None = None):
    """(model, tokenizer) ready to train: the checkpoint, then the finetuning_type hook (LoRA wraps the
    model here). n_train, the number of training examples, is what AdaLoRA's rank schedule is planned
    from (its total_step); tok, when the caller has loaded the tokenizer already (to prepare the data)."""
    if (cfg.stage, cfg.finetuning_type) not in IMPLEMENTED:
        raise UserError(f"stage {cfg.stage!r} with finetuning_type {cfg.finetuning_type!r} is not "
                         f"implemented yet; this version trains {sorted(IMPLEMENTED)}")
    if not cfg.model_name_or_path or not cfg.datasets or not cfg.output_dir:
        raise UserError("model_name_or_path, dataset and output_dir must be set (file or flags)")
    # full fine-tuning keeps fp32 weights (AdamW needs them); bf16/fp16 autocast the matmuls
    # qlora (lesson 09): the base is stored in NF4 while it loads; LoRA then trains on top of it
    quantize = "nf4" if cfg.finetuning_type == "qlora" else None
    model = minitune.load_model(cfg.model_name_or_path, device="cpu", dtype=torch.float32, quantize=quantize)
    tok = tok or training_tokenizer(cfg)
    fit_cutoff_len(cfg, model.config)
    # the adapter's new parameters (LoRA's A, prompts, ...) are drawn right after seeding, as the lessons'
    # tiny_sft does: --seed picks them, and they do not depend on what ran before in the process
    seed_everything(cfg.seed)
    total_steps = None if n_train is None else planned_steps(n_train, cfg, distributed.world()[1])
    try:
        model = apply_finetuning_type(model, cfg, tok, total_steps=total_steps)
    except ValueError as e:  # e.g. a lora_target that names no layer of this model
        raise UserError(f"finetuning_type {cfg.finetuning_type}: {e}") from None
    check_cutoff_len(cfg.cutoff_len, model, cfg.model_name_or_path)  # virtual tokens take positions too
    return model, tok


def training_tokenizer(cfg: TrainConfig):
    path = Path(cfg.model_name_or_path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"{path}: no tokenizer files (tokenizer.json, or tokenizer.model)")
    return minitune.load_tokenizer(path)


def fit_cutoff_len(cfg: TrainConfig, model_config) -> None:
    """A cutoff_len above the model's context (less the virtual tokens of prompt / prefix tuning) shrinks to
    it, with a note: positions past the context were never trained, so examples are cut there. (LLaMA-
    Factory's example configs say 2048 whatever the model; `check_cutoff_len` checks again once the
    method is on.)"""
    virtual = cfg.virtual_tokens if cfg.finetuning_type in ("prefix", "prompt", "ptuning") else 0
    room = model_config.max_position_embeddings - virtual
    if cfg.cutoff_len > room:
        default = " (the default)" if cfg.cutoff_len == TrainConfig.cutoff_len else ""
        if distributed.is_main():  # every process cuts, one says so
            print(f"note: cutoff_len {cfg.cutoff_len}{default} is cut to {room}, the model's context"
                  + (f" less {virtual} virtual tokens" if virtual else ""), file=sys.stderr)
        cfg.cutoff_len = room


def run_train(cfg: TrainConfig):
    # before anything loads: an output_dir holding another run stops here, unless resume or
    # overwrite_output_dir says what to do with it (every stage; train() and the RL loops check again)
    check_output_dir(cfg)
    resolve_datasets(cfg.datasets, cfg.dataset_dir)  # an unknown data set name stops here too, listing the known
    if cfg.stage in ("ppo", "grpo"):
        return run_rl(cfg)
    if cfg.stage in ("rm", "dpo", "kto"):
        return run_preference(cfg)
    if cfg.stage == "pt":
        return run_pretrain(cfg)
    # the data first: AdaLoRA plans its rank schedule from the number of training steps
    tok = training_tokenizer(cfg)
    fit_cutoff_len(cfg, ModelConfig.from_file(Path(cfg.model_name_or_path) / "config.json"))
    examples = [ex for spec in resolve_datasets(cfg.datasets, cfg.dataset_dir)
                for ex in load_sft(spec, cfg.max_samples).examples]
    data = prepare_sft(examples, tok, cfg.chat_template, cutoff_len=cfg.cutoff_len, val_size=cfg.val_size, seed=cfg.seed)
    main = distributed.is_main()
    if main:
        print(f"data: {data.report.summary()}")
    if cfg.eval_datasets:  # held-out sets named in the config, instead of a val_size split of the training data
        held = [ex for spec in resolve_datasets(cfg.eval_datasets, cfg.dataset_dir)
                for ex in load_sft(spec, cfg.max_samples).examples]
        evaluation = prepare_sft(held, tok, cfg.chat_template, cutoff_len=cfg.cutoff_len, seed=cfg.seed)
        data.val = evaluation.train
        if main:
            print(f"eval_dataset: {evaluation.report.summary()}")
    train_and_save(cfg, tok, data)


def train_and_save(cfg: TrainConfig, tok, data, label: str = "") -> None:
    """The end of stages sft and pt: the model with its finetuning_type on it, the causal-LM training loop
    over data.train (evaluating on data.val), the final save, one line saying what was written."""
    model, tok = load_for_training(cfg, tok, n_train=len(data.train))
    result = train(model, data.train, cfg, val_data=data.val or None, collate=PaddingCollator(tok), tokenizer=tok,
                   **training_hooks(model, cfg))
    if distributed.is_main():
        saved = save_trained(model, tok, cfg)
        print(f"{label}trained {result.steps_text} in {result.runtime_s:.1f} s; {saved}"
              + (f"; loss curve {result.plot_path}" if result.plot_path else ""))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_preference(cfg: TrainConfig):
    """stage rm / dpo (lessons 10, 12) on {"prompt", "chosen", "rejected"} data. rm: the model plus a value
    head, saved as the model folder + value_head.safetensors. dpo: the model (full or LoRA) against itself
    before training as the reference (pref_beta, pref_loss, dpo_label_smoothing, pref_ftx; ref_model), or with
    pref_loss orpo / simpo no reference at all. kto: run_kto."""
    if cfg.stage == "kto":
        return run_kto(cfg)
    if cfg.ref_model and cfg.pref_loss in REFERENCE_FREE:
        print(f"note: ref_model is not used: pref_loss {cfg.pref_loss} needs no reference model", file=sys.stderr)
    model, tok = load_for_training(cfg)
    specs = resolve_datasets(cfg.datasets, cfg.dataset_dir)
    if len(specs) == 1 and specs[0].formatting is None and cfg.max_samples is None:
        records = specs[0].file  # a plain file: prepare_pairs names its lines in what it reports
    else:
        records = [rec for spec in specs for rec in load_pair_records(spec, cfg.max_samples)]
    data = prepare_pairs(records, tok, cfg.chat_template, cfg.cutoff_len, cfg.val_size, cfg.seed)
    if cfg.eval_datasets:  # held-out pairs named in the config, instead of a val_size split
        held = [rec for spec in resolve_datasets(cfg.eval_datasets, cfg.dataset_dir)
                for rec in load_pair_records(spec, cfg.max_samples)]
        data.val = prepare_pairs(held, tok, cfg.chat_template, cfg.cutoff_len, 0, cfg.seed).train
    main = distributed.is_main()
    if main:
        print(f"data: {data.report.summary()}" + "".join(f"\n  {n}" for n in data.report.notes))
    if not data.train:
        raise UserError("no usable preference pairs left (see the counts above)")
    if cfg.stage == "rm":
        rm = RewardModel(model)
        result = train_reward_model(rm, data, cfg, tok)
        if main and cfg.finetuning_type == "lora":  # the adapter and the value head (LLaMA-Factory's layout)
            saved = save_trained(model, tok, cfg) + f" with {save_value_head(rm, cfg.output_dir).name}"
        elif main:
            save_reward_model(rm, tok, cfg.output_dir)
            saved = f"reward model saved to {cfg.output_dir}"
    else:
        if cfg.pref_loss in REFERENCE_FREE:  # rlhf/orpo.py, rlhf/simpo.py: no reference log-probs to compute
            result = (train_orpo if cfg.pref_loss == "orpo" else train_simpo)(model, data, cfg, tok)
        else:
            result = train_dpo(model, data, cfg, tok, reference=load_reference(cfg))
        if main:
            saved = save_trained(model, tok, cfg)
    if main:
        last = result.metrics.get(result.global_step, {})
        evals = {f"eval_{k}": v for k, v in result.eval_metrics.get(result.global_step, {}).items()}
        shown = {k: round(v, 4) for k, v in {**last, **evals}.items()}
        print(f"{cfg.stage}: trained {result.steps_text} in {result.runtime_s:.1f} s; last step {shown}; "
              f"{saved}" + (f"; loss curve {result.plot_path}" if result.plot_path else ""))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def load_reference(cfg: TrainConfig):
    """LLaMA-Factory's ref_model: a separate frozen reference for dpo / kto; None: the model before training."""
    if not cfg.ref_model:
        return None
    return minitune.load_model(cfg.ref_model, device="cpu", dtype=torch.float32).requires_grad_(False)


def run_kto(cfg: TrainConfig):
    """stage kto (rlhf/kto.py) on unpaired replies with a boolean label (data/kto.py; LLaMA-Factory's kto_tag
    column): the model (full or LoRA) against itself before training, or ref_model, as the reference."""
    def examples(names):
        return [ex for spec in resolve_datasets(names, cfg.dataset_dir)
                for ex in read_kto(spec.file, lambda rec, spec=spec: normalize_kto(rec, spec), cfg.max_samples)]

    model, tok = load_for_training(cfg)
    data = prepare_kto(examples(cfg.datasets), tok, cfg.chat_template, cfg.cutoff_len, cfg.val_size, cfg.seed)
    if cfg.eval_datasets:  # held-out replies named in the config, instead of a val_size split
        data.val = prepare_kto(examples(cfg.eval_datasets), tok, cfg.chat_template, cfg.cutoff_len).train
    main = distributed.is_main()
    if main:
        print(f"data: {data.summary()}")
    if not data.train:
        raise UserError("no usable KTO examples left (see the counts above)")
    result = train_kto(model, data, cfg, tok, reference=load_reference(cfg))
    if main:
        saved = save_trained(model, tok, cfg)
        shown = {k: round(v, 4) for k, v in result.metrics.get(result.global_step, {}).items()}
        print(f"kto: trained {result.steps_text} in {result.runtime_s:.1f} s; last step {shown}; {saved}"
              + (f"; loss curve {result.plot_path}" if result.plot_path else ""))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_pretrain(cfg: TrainConfig):
    """stage pt (data/pretrain.py): next-token loss on every token of raw text packed into cutoff_len blocks
    (.txt lines, or the `text` field / the column `columns.prompt` names of JSON / JSONL records)."""
    tok = training_tokenizer(cfg)
    fit_cutoff_len(cfg, ModelConfig.from_file(Path(cfg.model_name_or_path) / "config.json"))
    def texts(names):
        return [t for spec in resolve_datasets(names, cfg.dataset_dir)
                for t in read_texts(spec.file, spec.columns.get("prompt", "text"), cfg.max_samples)]

    data = prepare_pretrain(texts(cfg.datasets), tok, cfg.cutoff_len, cfg.val_size, cfg.seed)
    if cfg.eval_datasets:  # held-out text named in the config, instead of a val_size split
        data.val = prepare_pretrain(texts(cfg.eval_datasets), tok, cfg.cutoff_len).train
    if distributed.is_main():
        print(f"data: {data.summary()}")
    train_and_save(cfg, tok, data, label="pt: ")


def rl_prompts(cfg: TrainConfig, tok, rule=None) -> list[list[int]]:
    """ppo / grpo prompts: each example's conversation up to its last reply, rendered with the
    template and the assistant header; prompts that leave no room for max_new_tokens are skipped.
    rule(prompt ids, response ids): a reward rule, tried on every prompt here (with an empty reply) so
    that one it cannot read stops the run now, naming the example, not when a batch first draws it."""
    template, prompts, skipped = cfg.chat_template, [], 0
    for spec in resolve_datasets(cfg.datasets, cfg.dataset_dir):
        path = spec.file
        for i, messages in enumerate(load_sft(spec, cfg.max_samples).examples):
            turns = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
            ids = encode_segments(tok, template.segments(turns, add_generation_prompt=True))[0]
            if len(ids) + cfg.max_new_tokens > cfg.cutoff_len:
                skipped += 1
                continue
            try:
                if rule is not None:
                    rule(ids, [])
            except ValueError as e:  # e.g. GRPO's arithmetic rule given "Reverse the words: ..."
                raise UserError(f"{path}, example {i + 1}: the reward rule of stage {cfg.stage} cannot "
                                 f"score this prompt ({e}); keep only prompts it can score, or set "
                                 "reward_model to a reward model folder") from None
            prompts.append(ids)
    if distributed.is_main():
        print(f"prompts: {len(prompts)}" + (f" ({skipped} skipped: longer than cutoff_len - max_new_tokens)"
                                            if skipped else ""))
    if not prompts:
        raise UserError("no prompts left for ppo/grpo (check dataset and cutoff_len)")
    return prompts


def run_rl(cfg: TrainConfig):
    """stage ppo / grpo (lessons 11, 13): the actor is the model (full, or LoRA with the reference =
    the adapter switched off); the reward is a reward model folder or the tiny world's rule."""
    # settings the trainer's stages read but PPO / GRPO here do not: say so rather than ignore them quietly
    unused = [k for k in RL_UNUSED if getattr(cfg, k) != TrainConfig.__dataclass_fields__[k].default]
    if unused and distributed.is_main():
        print(f"note: stage {cfg.stage} does not use {', '.join(unused)} (it trains in float32 at a constant "
              "learning rate and logs every step; lessons 11 and 13)", file=sys.stderr)
    rank, world = distributed.world()
    if world > 1 and not cfg.fsdp:
        raise UserError(f"stage {cfg.stage} on {world} processes runs sharded: set fsdp (full_shard or "
                        "shard_grad_op) or deepspeed (a ZeRO stage 2 / 3 config); see lesson 14")
    if cfg.deepspeed and rank == 0:
        print(read_deepspeed(cfg.deepspeed)[1], file=sys.stderr)
    actor, tok = load_for_training(cfg)
    device = distributed.setup(cfg.device)  # this process's device (its own GPU under torchrun)
    base = minitune.load_pretrained(cfg.model_name_or_path, device=device, dtype=torch.float32)[0]
    actor.to(device)
    reference = None if cfg.finetuning_type == "lora" else copy.deepcopy(base)  # None: the adapter off
    stops = stop_ids(tok)
    pad = tok.pad_id if tok.pad_id is not None else stops[0]
    if cfg.reward_model:
        reward = load_reward_model(cfg.reward_model, device=device)[0]
    else:
        # the rule reads the user's message, which it finds by the prompts' template
        reward = rlhf.text_reward(preference_score if cfg.stage == "ppo" else rlhf.arithmetic_reward, tok, stops, cfg.chat_template)
    prompts = rl_prompts(cfg, tok, None if cfg.reward_model else reward)
    # LLaMA-Factory: rollouts per step = per-device batch x accumulation on each of the W processes
    mini = cfg.per_device_train_batch_size * world
    batch = mini * cfg.gradient_accumulation_steps
    log = str(Path(cfg.output_dir) / "trainer_log.jsonl")
    # checkpoint-{step}/ beside the log; resume continues from the last one (rlhf/rl_checkpoint.py)
    checkpointing = dict(save_steps=cfg.save_steps, output_dir=cfg.output_dir, resume=cfg.resume,
                         overwrite_output_dir=cfg.overwrite_output_dir, save_total_limit=cfg.save_total_limit)
    ran = []  # the records of the steps this call runs (a resumed run's list also holds those before)
    if cfg.stage == "ppo":
        steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * len(prompts) / batch))
        rl = rlhf.PPOConfig(steps=steps, batch_size=batch, mini_batch_size=mini, ppo_epochs=cfg.ppo_epochs,
                       learning_rate=cfg.learning_rate, init_kl_coef=0.2 if cfg.init_kl_coef is None else cfg.init_kl_coef,
                       adap_kl_ctrl=cfg.ppo_target is not None, target_kl=cfg.ppo_target or 6.0,
                       max_new_tokens=cfg.max_new_tokens, max_grad_norm=cfg.max_grad_norm or float("inf"),
                       seed=cfg.seed, log_path=log, fsdp=cfg.fsdp, **checkpointing)
        critic = RewardModel(base, init_std=0.0).to(device)  # a zero value head: V = 0 until it learns (lesson 11)
        records = rlhf.train_ppo(actor, critic, reference, reward, prompts, rl, stops, pad, on_step=ran.append)
    else:
        steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * len(prompts) / batch))
        rl = rlhf.GRPOConfig(steps=steps, batch_size=batch, num_generations=cfg.num_generations,
                        mini_batch_size=mini * cfg.num_generations, learning_rate=cfg.learning_rate,
                        beta=0.04 if cfg.init_kl_coef is None else cfg.init_kl_coef, max_new_tokens=cfg.max_new_tokens,
                        max_grad_norm=cfg.max_grad_norm or float("inf"), seed=cfg.seed, log_path=log,
                        fsdp=cfg.fsdp, **checkpointing)
        records = rlhf.train_grpo(actor, reference, reward, prompts, rl, stops, pad, on_step=ran.append)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if rank > 0:  # rank 0 saves, draws and reports
        return
    first, last = records[0], records[-1]
    saved = save_trained(actor.cpu(), tok, cfg)
    # plot_loss: what RL climbs and what holds it back, per step (LLaMA-Factory's PPO plots the reward too)
    curves = [plot_log(log, Path(cfg.output_dir) / f"training_{key}.png", key)
              for key in ("reward", "kl")] if cfg.plot_loss else []
    resumed = (f" (this call ran {len(ran)}, resuming from checkpoint-{len(records) - len(ran)})"
               if len(ran) < len(records) else "")
    print(f"{cfg.stage}: {len(records)} steps{resumed} in {last['seconds']:.1f} s; reward {first['reward']:.3f} -> "
          f"{last['reward']:.3f}, KL to the reference {last['kl']:.3f}; {saved}; log {log}"
          + (f"; curves {', '.join(map(str, curves))}" if curves else ""))


# ----------------------------------------------------------------------------- entry point


# llamafactory-cli chat / export config keys -> `minitune chat` / `generate` flags (dest names)
INFERENCE_KEYS = {"model_name_or_path": "model", "adapter_name_or_path": "adapter", "template": "template",
                  "default_system": "system", "max_new_tokens": "max_new_tokens", "temperature": "temperature",
                  "top_p": "top_p", "top_k": "top_k", "enable_thinking": "enable_thinking"}
INFERENCE_NOTED = {"finetuning_type": "the adapter folder says which method it holds",
                   "infer_backend": "minitune has one backend, its own generate loop",
                   "trust_remote_code": "minitune runs no code from a model folder",
                   "infer_dtype": "use --dtype"}


def settings_from_file(path, verb: str, keys: dict, noted_keys: dict) -> dict:
    """A chat / export yaml (LLaMA-Factory's examples/inference, examples/merge_lora) as flag defaults:
    `keys` maps its keys to flag names, `noted_keys` are accepted with a note, anything else is an error."""
    settings, noted = {}, []
    for key, value in read_config_file(path).items():
        if key in keys:
            settings[keys[key]] = value
        elif key == "do_sample" and verb != "export":  # false: greedy; true: LLaMA-Factory's sampling unless set
            settings.setdefault("temperature", 0.95 if value else 0.0)
            if value:
                settings.setdefault("top_p", 0.7)
        elif key in noted_keys:
            noted.append(f"{key} ({noted_keys[key]})")
        else:
            raise UserError(f"{path}: unknown key {key!r} for {verb} (expected one of "
                            f"{', '.join([*keys, *noted_keys])})")
    if noted:
        print(f"note: {path}: not used: {'; '.join(noted)}", file=sys.stderr)
    if isinstance(settings.get("adapter"), list):
        settings["adapter"] = ",".join(settings["adapter"])
    return settings


class UserExit(SystemExit):
    """Exit code 2 after an `error: ...` line; str() is that line's message (what tests match on)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def main(argv=None):
    """Bad input (any UserError: config, data, checkpoint, template, adapter; a missing file) ends in one line,
    `error: <file>[:line]: <what> (<expected>)`, and exit code 2; a diverging run in one line and
    exit code 1; Ctrl-C in chat or generate quietly (130). Anything else is a bug and keeps its traceback."""
    try:
        return run_command(argv)
    except (UserError, FileNotFoundError) as e:  # a path that names nothing is bad input too
        message = str(e).removeprefix("error: ")
        print(f"error: {message}", file=sys.stderr)
        raise UserExit(message) from None
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def run_command(argv=None):
    parser = argparse.ArgumentParser(prog="minitune", description="LLM post-training from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)
    tp = train_parser(sub)
    gp = sub.add_parser("generate", help="continue one prompt", description="Generate a reply to one prompt.")
    chat.model_args(gp)
    gp.add_argument("--prompt", required=True, help="the prompt (a user message when --template is given)")
    cp = sub.add_parser("chat", help="interactive chat in the terminal",
                        description="Chat with a model: the reply streams token by token; the history is "
                                    "kept; /reset clears it, /exit quits. Reads stdin, so input can be piped.")
    chat.model_args(cp)
    ep = sub.add_parser("export", help="merge a LoRA adapter into its base and write a Hugging Face checkpoint",
                        description="Like llamafactory-cli export: model + adapter -> one merged model folder.")
    ep.add_argument("config", nargs="?", help="an export config (.yaml/.json: model_name_or_path, "
                                              "adapter_name_or_path, export_dir, export_size, ...); flags win")
    ep.add_argument("--model", help="the base model folder (model_name_or_path)")
    ep.add_argument("--adapter", help="the LoRA / AdaLoRA adapter folder (adapter_name_or_path)")
    ep.add_argument("--export_dir", help="where the merged model goes (a new or empty folder)")
    ep.add_argument("--export_size", type=float, default=5, help="GB per safetensors shard (default 5)")
    ep.add_argument("--export_device", default="cpu", help="cpu | auto (where the merge runs)")
    ep.add_argument("--export_legacy_format", type=lambda v: v.lower() == "true", default=False,
                    help="false: safetensors (true, pickled .bin, is refused)")
    vp = sub.add_parser("eval", help="score a model on MMLU / CMMLU / C-Eval folders, or a text's perplexity",
                        description="Like llamafactory-cli eval: few-shot multiple choice (scorer letter, as "
                                    "LLaMA-Factory; scorer loglik, as lm-evaluation-harness), or task ppl.")
    eval_args(vp)
    args, unknown = parser.parse_known_args(argv)
    if args.command != "train" and args.config:  # the file's settings become defaults; flags given still win
        keys = {"export": (EXPORT_KEYS, EXPORT_NOTED), "eval": (EVAL_KEYS, EVAL_NOTED)}.get(
            args.command, (INFERENCE_KEYS, INFERENCE_NOTED))
        {"generate": gp, "chat": cp, "export": ep, "eval": vp}[args.command].set_defaults(
            **settings_from_file(args.config, args.command, *keys))
        args, unknown = parser.parse_known_args(argv)
    if args.command == "eval":  # minitune/eval/run.py: MMLU / CMMLU / C-Eval folders, or task ppl
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if not args.model:
            parser.error("eval: a model is needed: --model, or model_name_or_path in a config file")
        run_eval(args)
        return
    if args.command == "export":
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if not args.model or not args.export_dir:
            parser.error("export: model_name_or_path and export_dir are needed (config file or flags)")
        out = export(args.model, args.adapter, args.export_dir, args.export_size, args.export_device,
                     args.export_legacy_format)
        print(f"exported {'the merged model' if args.adapter else 'the model'} to {out}")
        return
    if args.command != "train":
        if not args.model:
            parser.error(f"{args.command}: a model is needed: --model, or model_name_or_path in a config file")
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.template:  # a typo fails now, not after the model has loaded
            get_template(args.template)
        try:
            return chat.run_generate(args) if args.command == "generate" else chat.run_chat(args)
        except KeyboardInterrupt:  # Ctrl-C: leave the terminal on a fresh line, no traceback
            print(file=sys.stderr)
            raise SystemExit(130) from None
    for flag in unknown:  # an unknown --flag: say which name was probably meant
        if flag.startswith("--") and flag[2:].split("=")[0] not in FIELDS:
            coerce(flag[2:].split("=")[0], None, f"command line ({flag})")
    if unknown:
        tp.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = {k: v for k, v in vars(args).items() if k in FIELDS}
    run_train(load_config(args.config, overrides))
