"""The training config: every knob of a run, under the names LLaMA-Factory gives them.

A reader of the LLaMA-Factory tutorials writes

    stage: sft
    finetuning_type: full
    learning_rate: 1.0e-4
    per_device_train_batch_size: 4
    ...

and minitune reads the same file. Three sources, later ones win:

    dataclass defaults  <  config file (.json, or the `key: value` subset of YAML)  <  --flags

This file is the dataclass and its checks: the fields with their defaults, and `validate`,
which stops the run before any model is loaded when a value cannot work (an unknown stage, a
learning rate <= 0, bf16 and fp16 together), naming the source and the key. Reading a file and
the command-line values into it is config_file.py (`load_config`).
"""

import dataclasses
from dataclasses import dataclass

from ..data.templates import TEMPLATES, Template, ThinkingTemplate
from ..errors import UserError
from .fsdp import parse_fsdp, read_deepspeed

STAGES = ("pt", "sft", "rm", "ppo", "dpo", "kto", "grpo")  # LLaMA-Factory's names; the CLI says which exist yet
FINETUNING_TYPES = ("full", "freeze", "lora", "qlora", "adalora", "adapter", "prefix", "prompt", "ptuning")
PEFT_TYPES = ("lora", "qlora", "adalora", "adapter", "prefix", "prompt", "ptuning")  # lessons 06-09, minitune.peft
SCHEDULERS = ("cosine", "linear", "constant")
PREF_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo")  # stage dpo: rlhf/dpo.py DPO_LOSS_TYPES, orpo.py, simpo.py
REFERENCE_FREE = ("orpo", "simpo")  # pref_loss values that use no reference model


class TrainConfigError(UserError):
    """A config file or flag minitune cannot use; the message names the source and the key."""


@dataclass
class TrainConfig:
    # what to train
    stage: str = "sft"  # training stage: pt (raw text) | sft | rm | dpo | kto | ppo | grpo
    finetuning_type: str = "full"  # which weights train: full | lora | qlora | adalora | adapter | prefix | prompt | ptuning
    quantization_bit: int | None = None  # 4: the frozen base stored in NF4 while it loads (lora then means qlora)
    quantization_method: str = "bnb"  # with quantization_bit: bnb (bitsandbytes' NF4, what minitune.quant computes)
    model_name_or_path: str | None = None  # checkpoint folder (config.json + safetensors + tokenizer)
    dataset: str | list[str] | None = None  # names in dataset_dir/dataset_info.json, or data files (Alpaca, ShareGPT, OpenAI)
    template: str = "chatml"  # chat template name, see minitune.data.TEMPLATES
    cutoff_len: int = 1024  # longer examples are cut to this many tokens
    dataset_dir: str = "data"  # where dataset_info.json registers data sets by name (minitune/data/registry.py)
    max_samples: int | None = None  # read at most this many examples of each data set (None: all)
    val_size: float = 0.0  # held-out fraction (< 1) or count for the evaluation loss
    eval_dataset: str | list[str] | None = None  # data sets (names or files) for the evaluation loss, instead of val_size
    mix_strategy: str = "concat"  # several data sets: concat joins them in order (LLaMA-Factory's default)
    default_system: str | None = None  # system prompt for conversations without one (None: the template's own)
    enable_thinking: bool = True  # qwen3 template: false trains answers without a reasoning block (LLaMA-Factory's)
    # optimisation
    learning_rate: float = 5e-5  # peak learning rate of AdamW
    num_train_epochs: float = 3.0  # passes over the training data
    max_steps: int | None = None  # if set, the number of optimizer steps (overrides num_train_epochs)
    per_device_train_batch_size: int = 8  # examples per forward pass on each device
    per_device_eval_batch_size: int | None = None  # examples per evaluation forward pass (None: as training)
    gradient_accumulation_steps: int = 1  # forward passes summed into one optimizer step
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_ratio: float = 0.0  # fraction of the steps spent ramping the learning rate up from 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay (never on norms and biases)
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    # precision
    bf16: bool = False  # autocast matmuls to bfloat16
    fp16: bool = False  # autocast to float16 with a dynamic loss scaler
    # logging, evaluation, checkpoints
    logging_steps: int = 10  # write a trainer_log.jsonl line every N steps
    eval_steps: int | None = None  # evaluation loss every N steps (None: only at the end)
    save_steps: int = 500  # checkpoint-{step}/ every N steps (0: none); every stage (ppo/grpo: actor, critic, RL state)
    plot_loss: bool = False  # write training_loss.png into output_dir (ppo/grpo: training_reward.png, training_kl.png)
    output_dir: str | None = None  # where checkpoints, the log and the final model go
    resume: bool = False  # continue from the last checkpoint in output_dir
    resume_from_checkpoint: bool | str | None = None  # LLaMA-Factory's name for resume: true (or null: start anew)
    overwrite_output_dir: bool = False  # output_dir holds another run: delete its checkpoints, log and model files, start afresh
    save_total_limit: int | None = None  # keep only the newest N checkpoint-* folders (None: all)
    seed: int = 42  # seeds python, numpy and torch; also the data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # sharding over the torchrun processes (train/fsdp.py, rlhf/sharded.py, lesson 14); every stage, full / freeze / lora
    fsdp: str | list[str] | None = None  # full_shard (ZeRO-3) | shard_grad_op (ZeRO-2), optionally + offload: "full_shard offload" (HF TrainingArguments' names)
    deepspeed: str | None = None  # a DeepSpeed JSON config (LLaMA-Factory's ds_z3_config.json): ZeRO stage 2 / 3 run as fsdp shard_grad_op / full_shard
    # parameter-efficient fine-tuning (finetuning_type other than full; minitune/peft, lessons 06-08)
    lora_rank: int = 8  # LoRA rank r
    lora_alpha: float | None = None  # LoRA / AdaLoRA alpha (None: 2 x the rank, as LLaMA-Factory)
    lora_dropout: float = 0.0  # dropout on the LoRA / AdaLoRA path
    lora_target: str | list[str] = "all"  # layers to adapt: all (every linear but lm_head) or names, e.g. q_proj,v_proj
    use_rslora: bool = False  # rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r
    adalora_init_r: int = 12  # AdaLoRA: starting rank of every adapted layer
    adalora_target_r: int = 8  # AdaLoRA: average rank per layer after pruning
    adalora_tinit: int = 0  # AdaLoRA: warm-up steps at the full rank budget
    adalora_tfinal: int = 0  # AdaLoRA: last steps with the ranks frozen
    adalora_deltaT: int = 1  # AdaLoRA: prune every deltaT steps while the budget falls
    adalora_orth_reg_weight: float = 0.5  # AdaLoRA: weight of the orthogonality regulariser in the loss
    adapter_bottleneck: int = 64  # adapter: bottleneck width
    adapter_mode: str = "serial"  # adapter: serial (Houlsby, after each sublayer) | parallel (beside it)
    num_virtual_tokens: int = 20  # prefix / prompt / ptuning: number of virtual tokens
    pre_seq_len: int | None = None  # ChatGLM's name for num_virtual_tokens (wins when set)
    prefix_projection: bool = False  # prefix: reparameterise the prefix through an MLP
    encoder_reparameterization_type: str = "MLP"  # ptuning: MLP | LSTM prompt encoder
    encoder_hidden_size: int | None = None  # prefix MLP / ptuning encoder width (None: the model's)
    prompt_tuning_init_text: str | None = None  # prompt: start the soft prompt from this text's embeddings
    export_dir: str | None = None  # lora / adalora: also write the merged full model here
    trainable_tokens: str | list[str] | None = None  # PEFT types, sft: also train these embedding rows (and a tied lm_head's), tokens or ids, e.g. "<|im_start|>,<|im_end|>"
    additional_target: str | list[str] | None = None  # lora / qlora: also train these whole modules, saved with the adapter (PEFT's modules_to_save), e.g. embed_tokens,lm_head
    # RLHF by reinforcement learning (stage ppo / grpo; minitune/rlhf, lessons 11 and 13)
    reward_model: str | None = None  # ppo / grpo: reward model folder (None: ppo the tiny world's preference rule, grpo the arithmetic check)
    ppo_epochs: int = 4  # ppo: passes over each rollout batch
    ppo_target: float | None = None  # ppo: target KL of the adaptive KL controller (None: a fixed init_kl_coef)
    init_kl_coef: float | None = None  # ppo: KL penalty coefficient; grpo: beta of the k3 KL (None: 0.2 / 0.04)
    max_new_tokens: int = 24  # ppo / grpo: longest sampled response
    num_generations: int = 8  # grpo: responses sampled per prompt (the group)
    # preference optimisation (stage rm / dpo; minitune/rlhf, lessons 10 and 12)
    pref_beta: float = 0.1  # dpo: beta, how tightly the policy is tied to the reference (larger: tighter)
    pref_loss: str = "sigmoid"  # dpo: sigmoid (DPO) | ipo | hinge | orpo | simpo (the last two without a reference)
    dpo_label_smoothing: float = 0.0  # dpo: assumed rate eps of flipped labels, in [0, 0.5) (cDPO; sigmoid only)
    pref_ftx: float = 0.0  # dpo: weight of an SFT term on the chosen reply (-log p per token) added to the loss
    simpo_gamma: float = 0.5  # dpo with pref_loss simpo: the target reward margin gamma
    kto_chosen_weight: float = 1.0  # kto: weight lambda_D of the desirable replies' loss
    kto_rejected_weight: float = 1.0  # kto: weight lambda_U of the undesirable replies' loss
    ref_model: str | None = None  # dpo / kto: reference model folder (None: the model before training)

    def __post_init__(self):
        self.validate()

    def validate_llamafactory_aliases(self, bad):
        """LLaMA-Factory keys that say what a minitune key says: folded into it here, once."""
        if self.quantization_bit is not None:
            if self.quantization_bit != 4:
                bad("quantization_bit", f"{self.quantization_bit} is not supported (expected 4: NF4 with double "
                                        "quantization, as bitsandbytes' 4-bit; minitune.quant, lesson 09)")
            if self.quantization_method != "bnb":
                bad("quantization_method", f"{self.quantization_method!r} is not supported (expected bnb)")
            if self.finetuning_type == "lora":  # LoRA over a 4-bit base is QLoRA (Dettmers et al. 2023)
                self.finetuning_type = "qlora"
            elif self.finetuning_type != "qlora":
                bad("quantization_bit", f"a 4-bit base trains only with finetuning_type lora (QLoRA), "
                                        f"not {self.finetuning_type}")
        flag = self.resume_from_checkpoint
        if isinstance(flag, str) and flag.lower() in ("true", "false", "null"):
            flag = {"true": True, "false": False, "null": None}[flag.lower()]
        if isinstance(flag, str):
            bad("resume_from_checkpoint", f"{flag!r}: a checkpoint path is not supported; minitune resumes from "
                                          "the newest complete checkpoint in output_dir (set it to true)")
        if flag:
            self.resume = True

    def validate(self, source: str = "TrainConfig"):
        def bad(key, msg):
            raise TrainConfigError(f"{source}: {key}: {msg}")

        for key, allowed in (("stage", STAGES), ("finetuning_type", FINETUNING_TYPES),
                             ("lr_scheduler_type", SCHEDULERS)):
            if getattr(self, key) not in allowed:
                bad(key, f"{getattr(self, key)!r} is not one of {', '.join(allowed)}")
        self.validate_llamafactory_aliases(bad)
        if self.template not in TEMPLATES:  # before any model loads: a typo costs nothing
            bad("template", f"unknown chat template {self.template!r} (known: {', '.join(TEMPLATES)})")
        if self.bf16 and self.fp16:
            bad("bf16", "bf16 and fp16 are both true; pick one mixed-precision dtype")
        if self.mix_strategy != "concat":  # interleave_under / interleave_over sample across the sets
            bad("mix_strategy", f"{self.mix_strategy!r}: only concat is implemented (the data sets joined in order)")
        if self.eval_dataset and self.val_size:
            bad("eval_dataset", f"and val_size {self.val_size} both set; the evaluation data is one or the other")
        self.validate_preference(bad)
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            bad("learning_rate", f"must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.max_samples is not None and self.max_samples < 1:
            bad("max_samples", f"must be >= 1 (or unset), got {self.max_samples}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"must be >= 1 (or unset), got {self.max_steps}")
        for key in ("plot_loss", "resume"):
            if getattr(self, key) and not self.output_dir:
                bad(key, "needs an output_dir (where the picture / the checkpoints are)")
        self.validate_peft(bad)
        self.validate_sharding(bad)

    def validate_sharding(self, bad):
        """fsdp / deepspeed (train/fsdp.py): known options; a DeepSpeed file is read and becomes the fsdp
        option it equals (the trainer prints a note saying so). What sharding does not cover yet is refused."""
        key = "fsdp"
        if self.deepspeed:
            key = "deepspeed"
            try:
                option, _ = read_deepspeed(self.deepspeed)
            except ValueError as e:
                bad("deepspeed", str(e))
            if self.fsdp and parse_fsdp(self.fsdp) != parse_fsdp(option):
                bad("fsdp", f"{self.fsdp!r} and deepspeed {self.deepspeed} (= fsdp {option!r}) disagree; set one")
            self.fsdp = option
        try:
            sharding = parse_fsdp(self.fsdp)
        except ValueError as e:
            bad(key, str(e))
        if sharding is None:
            return
        if self.finetuning_type not in ("full", "freeze", "lora"):
            bad(key, f"sharding runs finetuning_type full, freeze or lora; not yet {self.finetuning_type}")
        if self.fp16:
            bad(key, "fp16 with sharding is not supported (its loss scaler would need sharded gradients); use bf16")
        if self.trainable_tokens:
            bad(key, "trainable_tokens with sharding is not implemented yet")

    def validate_peft(self, bad):
        """The parameter-efficient settings (only those the chosen finetuning_type reads are checked)."""
        ft = self.finetuning_type
        positive = {"lora": ("lora_rank",), "qlora": ("lora_rank",), "adalora": ("adalora_init_r", "adalora_target_r", "adalora_deltaT"),
                    "adapter": ("adapter_bottleneck",), "prefix": ("num_virtual_tokens", "pre_seq_len"),
                    "prompt": ("num_virtual_tokens", "pre_seq_len"), "ptuning": ("num_virtual_tokens", "pre_seq_len",
                                                                                 "encoder_hidden_size")}
        for key in positive.get(ft, ()):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if ft in ("lora", "qlora", "adalora") and not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if ft == "adalora":
            if self.adalora_target_r > self.adalora_init_r:
                bad("adalora_target_r", f"{self.adalora_target_r} is above adalora_init_r {self.adalora_init_r}; "
                                        "AdaLoRA only prunes")
            for key in ("adalora_tinit", "adalora_tfinal"):
                if getattr(self, key) < 0:
                    bad(key, f"must be >= 0, got {getattr(self, key)}")
        if ft == "adapter" and self.adapter_mode not in ("serial", "parallel"):
            bad("adapter_mode", f"{self.adapter_mode!r} is not one of serial, parallel")
        if ft == "ptuning" and self.encoder_reparameterization_type.upper() not in ("MLP", "LSTM"):
            bad("encoder_reparameterization_type", f"{self.encoder_reparameterization_type!r} is not one of MLP, LSTM")
        if self.trainable_tokens and ft not in PEFT_TYPES:
            bad("trainable_tokens", f"finetuning_type {ft} trains the whole embedding already; the rows are for "
                                    f"the parameter-efficient types ({', '.join(PEFT_TYPES)})")
        if self.trainable_tokens and self.stage != "sft":
            bad("trainable_tokens", f"stage {self.stage}: only sft (a reference model made by switching the "
                                    "adapter off would keep the trained rows)")
        if self.export_dir and ft not in ("lora", "adalora"):
            bad("export_dir", f"merging into the weights needs finetuning_type lora or adalora, not {ft}")
        if self.additional_targets:  # minitune/peft/modules_to_save.py; the names are checked on the model
            if ft not in ("lora", "qlora"):
                bad("additional_target", f"whole modules train beside LoRA: finetuning_type lora or qlora, not {ft}")
            if self.stage in ("ppo", "grpo"):
                bad("additional_target", f"stage {self.stage}: the reference is the actor with LoRA switched off "
                                         "while it trains, which would keep the trained modules (not supported)")
            if self.fsdp or self.deepspeed:
                bad("additional_target", "with sharding (fsdp / deepspeed) is not implemented yet")

    @property
    def additional_targets(self) -> list[str]:
        """`additional_target` as a list of module names: LLaMA-Factory writes them as one comma list."""
        return names_list(self.additional_target)

    @property
    def lora_targets(self) -> str | list[str]:
        """`lora_target` as minitune.peft takes it: "all-linear", or a list of module names."""
        items = self.lora_target if isinstance(self.lora_target, list) else self.lora_target.split(",")
        items = [t.strip() for t in items if t.strip()]
        return "all-linear" if items in (["all"], ["all-linear"]) else items

    @property
    def virtual_tokens(self) -> int:
        return self.pre_seq_len or self.num_virtual_tokens

    def validate_preference(self, bad):
        """pref_* and kto_* keys (stage dpo / kto): the loss types minitune.rlhf implements, eps below 1/2."""
        if self.pref_loss not in PREF_LOSSES:
            bad("pref_loss", f"{self.pref_loss!r} is not one of {', '.join(PREF_LOSSES)} (for unpaired data use "
                             "stage kto)")
        for key in ("kto_chosen_weight", "kto_rejected_weight"):
            if getattr(self, key) <= 0:
                bad(key, f"must be > 0, got {getattr(self, key)}")
        if self.pref_ftx < 0:
            bad("pref_ftx", f"must be >= 0, got {self.pref_ftx}")
        if self.pref_ftx and self.stage == "kto":
            bad("pref_ftx", "stage kto has no SFT term here yet (pref_ftx applies to stage dpo)")
        if self.pref_beta <= 0:
            bad("pref_beta", f"must be > 0, got {self.pref_beta}")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            bad("dpo_label_smoothing", f"must be in [0, 0.5), got {self.dpo_label_smoothing}")
        if self.dpo_label_smoothing and self.pref_loss != "sigmoid":
            bad("dpo_label_smoothing", f"applies to pref_loss sigmoid only, not {self.pref_loss!r}")

    @property
    def datasets(self) -> list[str]:
        """`dataset` as a list: LLaMA-Factory writes several as one comma-separated string."""
        return names_list(self.dataset)

    @property
    def eval_datasets(self) -> list[str]:
        return names_list(self.eval_dataset)

    @property
    def chat_template(self) -> Template:
        """`template` by name, with `default_system` in place of its own default system prompt when set, and
        `enable_thinking` on a thinking layout (qwen3; data/templates.py ThinkingTemplate)."""
        template = TEMPLATES[self.template]
        if self.default_system is not None:
            template = dataclasses.replace(template, default_system=self.default_system)
        if isinstance(template, ThinkingTemplate):
            template = dataclasses.replace(template, enable_thinking=self.enable_thinking)
        return template


def names_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else value.split(",")
    return [d.strip() for d in items if d.strip()]
