"""The training loop, for every stage: SFT here; reward modelling and DPO reuse it via `loss_fn`.

One optimizer step:

    N = trainable tokens in the whole global batch (counted from the labels on all W processes)
    for each of A micro-batches (B examples each, this process's share of the global batch):
        loss_i, n_i = loss_fn(model, batch)        # mean over its n_i trainable tokens
        backward(loss_i * n_i / N * W)             # DDP then averages over the W processes
    clip ||grad|| to max_grad_norm;  AdamW step;  scheduler step

so the gradient is that of the mean loss over all N trainable tokens of the global batch: A
micro-batches of B on W processes give the same step as one batch of A * B * W examples, even
when examples differ in length. (Averaging per-micro-batch means instead would weight a token
of a short batch more than one of a long batch.)

Mixed precision: `bf16` runs matmuls in bfloat16 under autocast while the weights, gradients
and AdamW states stay fp32. `fp16` does the same in float16, whose narrow range would flush
small gradients to zero, so the loss is multiplied by a large scale before backward and the
gradients divided by it afterwards (Micikevicius et al. 2018); when the scaled gradients
overflow the scaler skips that step and halves the scale, which we report.
"""

import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import memory  # a module, not its names: memory.py imports train.loss, whose package imports this file
from ..data import PaddingCollator
from ..seed import seed_everything
from . import distributed as dist
from . import fsdp
from .checkpoint import load_checkpoint, prune_checkpoints, resume_checkpoint, save_checkpoint
from .config import TrainConfig
from .evaluate import evaluate_metrics, split_output, to_device
from .loss import IGNORE_INDEX, causal_lm_loss
from .optim import make_optimizer
from .output_dir import check_output_dir
from .plot import plot_log
from .schedule import make_scheduler

LOG_FILE, PLOT_FILE = "trainer_log.jsonl", "training_loss.png"
# fp16: the loss scaler skips a step whose scaled gradients overflowed and halves its scale. A few skips
# are normal (one batch overflowing, or the scale settling). When they go on, the weights themselves have
# left float16's range, which no scale can fix: the run stops once more than FP16_MAX_SKIP_SHARE of the
# last FP16_WINDOW steps were skipped, or the loss was not finite FP16_PATIENCE steps in a row.
FP16_WINDOW, FP16_MAX_SKIP_SHARE, FP16_PATIENCE = 10, 0.5, 3


class TrainingDiverged(FloatingPointError):
    """The loss or the gradients stopped being finite; the message names the step and the last good
    checkpoint. Nothing is saved from such a run."""


def count_targets(batch: dict) -> int:
    """What a loss averages over, known before the forward pass: trainable next-token labels
    when the batch has labels, else its rows (e.g. the pairs of a preference batch)."""
    if "labels" in batch:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return len(next(iter(batch.values())))


@dataclass
class TrainResult:
    global_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss (steps run by this call)
    eval_losses: dict[int, float] = field(default_factory=dict)
    skipped_steps: list[int] = field(default_factory=list)  # fp16 steps the loss scaler skipped
    runtime_s: float = 0.0
    peak_memory_bytes: int | None = None  # torch.cuda.max_memory_allocated on GPU
    memory_estimate: object = None
    log_path: Path | None = None
    plot_path: Path | None = None
    last_checkpoint: Path | None = None
    metrics: dict[int, dict] = field(default_factory=dict)  # step -> extra metrics of loss_fn (see train)
    eval_metrics: dict[int, dict] = field(default_factory=dict)
    resumed_from: Path | None = None  # the checkpoint this call continued from (cfg.resume)
    state_bytes: int = 0  # parameter + optimizer-state bytes this process held at the end (under fsdp: its shards)

    @property
    def steps_text(self) -> str:
        """What this call trained, e.g. "26 steps (steps 15-40, resumed from checkpoint-14)"; a resumed run's
        global_step counts the steps before the checkpoint too."""
        if self.resumed_from is None:
            return f"{self.global_step} steps"
        ran = sorted(self.losses)
        if not ran:
            return f"0 steps ({self.resumed_from.name} had finished all {self.global_step})"
        where = f"step {ran[0]}" if len(ran) == 1 else f"steps {ran[0]}-{ran[-1]}"
        return f"{len(ran)} step{'s' * (len(ran) > 1)} ({where}, resumed from {self.resumed_from.name})"


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so a resumed
    run and every DDP process compute the same one without being told."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def _print_memory_estimate(model, cfg: TrainConfig, train_data: list):
    if not hasattr(model, "config") or not hasattr(model.config, "num_hidden_layers"):
        return None
    # a preference pair holds two sequences (chosen_input_ids, rejected_input_ids), run as two rows
    keys = [k for k in train_data[0] if k.endswith("input_ids")] or ["input_ids"]
    seq_len = min(cfg.cutoff_len, max(len(f.get(k, ())) for f in train_data for k in keys) or 1)
    dtype = next(model.parameters()).dtype
    method = {"freeze": "full", "adalora": "lora"}.get(cfg.finetuning_type, cfg.finetuning_type)
    if method not in ("full", "lora", "qlora"):
        return None  # no formula for adapters and soft prompts (what they train is tiny anyway)
    r = cfg.adalora_init_r if cfg.finetuning_type == "adalora" else cfg.lora_rank
    rows = cfg.per_device_train_batch_size * len(keys)
    est = memory.estimate_memory(model.config, method=method, dtype=dtype, batch_size=rows, seq_len=seq_len, lora_r=r,
                          autocast=cfg.bf16 or cfg.fp16)
    tqdm.write(str(est))
    return est


def planned_steps(n_examples: int, cfg: TrainConfig, world_size: int = 1) -> int:
    """How many optimizer steps `train` will take on `n_examples` (max_steps, else the epochs of full
    global batches); known before training, e.g. for AdaLoRA's rank schedule."""
    steps_per_epoch = n_examples // (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size)
    return cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.num_train_epochs))


def train(model, train_data: list, cfg: TrainConfig, val_data: list | None = None, collate=None,
          loss_fn=None, tokenizer=None, count_fn=None, after_step=None) -> TrainResult:
    """Train the parameters of `model` that have requires_grad; see the module docstring.

    train_data / val_data: lists of features (dicts) that `collate(list) -> dict of tensors` batches
    (default: minitune.data.PaddingCollator). loss_fn(model, batch) -> (mean loss, count) defaults to
    `causal_lm_loss`; it must call `model(...)` (under DDP, the wrapper's forward syncs gradients).
    count_fn(batch) -> int gives that count before the forward pass (default `count_targets`).
    loss_fn may also return a third item, {name: batch mean}: those metrics are averaged like the loss
    and written into the log records beside it (evaluation: as eval_<name>).
    tokenizer: saved into full-model checkpoints so they load with minitune.load_pretrained.
    after_step(model, step): called after each optimizer step (step = 1, 2, ...), while the gradients
    are still there, before they are cleared; e.g. AdaLoRA's rank allocator reads them and masks
    what it prunes (after the update, so AdamW cannot move a pruned value off zero again).
    cfg.output_dir holding another run is an error unless cfg.resume or cfg.overwrite_output_dir
    (train/output_dir.py); cfg.save_total_limit keeps the newest checkpoints only.
    """
    check_output_dir(cfg)
    device = dist.setup(cfg.device)
    rank, world_size = dist.world()
    main = rank == 0
    seed_everything(cfg.seed)
    model.to(device).train()
    loss_fn, count_fn = loss_fn or causal_lm_loss, count_fn or count_targets
    if collate is None:
        collate = PaddingCollator(tokenizer, pad_id=None if tokenizer is not None else 0)

    B, A = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    global_batch = B * A * world_size
    if len(train_data) < global_batch:
        raise ValueError(f"{len(train_data)} training examples are fewer than one global batch of {global_batch} "
                         f"(per_device_train_batch_size {B} x gradient_accumulation_steps {A} x {world_size} processes)")
    # the last incomplete global batch of each epoch is dropped: every step sees the same number of
    # examples and every process has work (a process with none would hang DDP's all-reduce)
    steps_per_epoch = len(train_data) // global_batch
    total = planned_steps(len(train_data), cfg, world_size)

    amp_dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.fp16)
    sharding = fsdp.parse_fsdp(cfg.fsdp)
    if main and cfg.deepspeed:
        tqdm.write(fsdp.read_deepspeed(cfg.deepspeed)[1])
    if main and sharding and world_size == 1:
        tqdm.write(f"note: fsdp {sharding} on one process is not sharding (nothing to split the model with); "
                   "start several with torchrun --nproc_per_node N")
    sharded = sharding is not None and world_size > 1
    # FSDP (ZeRO-2/3, train/fsdp.py): `trained` holds this process's shards, `model` is empty until the end
    trained = fsdp.shard_model(model, sharding, cfg.bf16, device) if sharded else model
    optimizer = make_optimizer(trained, cfg.learning_rate, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, total, cfg.warmup_ratio, cfg.lr_scheduler_type)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # only what requires grad
    net = model
    if sharded:
        net = fsdp.ShardedForward(trained)
    elif world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    result = TrainResult(global_step=0)
    out = Path(cfg.output_dir) if cfg.output_dir else None
    step = 0
    if cfg.resume:
        # the newest checkpoint that loads: a damaged one is reported and the one before it used
        load = fsdp.load_sharded if sharded else load_checkpoint
        found = resume_checkpoint(out, lambda c: load(c, trained, optimizer, scheduler, scaler))
        if found is None:
            tqdm.write(f"resume: no checkpoint in {out}, starting from step 0")
        else:
            ckpt, info = found
            step = result.global_step = info["global_step"]
            result.resumed_from = ckpt
            if info.get("steps_per_epoch") != steps_per_epoch:
                tqdm.write(f"resume: warning, {ckpt} had {info.get('steps_per_epoch')} steps per epoch, now "
                           f"{steps_per_epoch} (data or batch size changed); the data order will differ")
            tqdm.write(f"resume: continuing from {ckpt} at step {step}")
    log_file = None
    if main and out:
        out.mkdir(parents=True, exist_ok=True)
        result.log_path = out / LOG_FILE
        kept = []
        if step and result.log_path.exists():  # keep the history up to the checkpoint, drop what came after
            kept = [ln for ln in result.log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        log_file = open(result.log_path, "w")
        log_file.writelines(ln + "\n" for ln in kept)
    if main:
        result.memory_estimate = _print_memory_estimate(model, cfg, train_data)
        if sharded and result.memory_estimate:  # what this rank holds of it (train/fsdp.py)
            tqdm.write(memory.per_rank_table(result.memory_estimate, world_size))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)  # this model's weights, and whatever else the caller holds

    def log(record: dict):
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    pbar = tqdm(total=total, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    window, metric_window, tokens, t_last = [], {}, 0.0, time.perf_counter()
    # fp16: steps in a row with a non-finite loss; (step, checkpoint) written so far, the resumed one first
    nonfinite, saved = 0, ([(step, result.resumed_from)] if result.resumed_from else [])
    t_start = t_last
    try:
        while step < total:
            epoch, pos = divmod(step, steps_per_epoch)
            chunk = epoch_order(len(train_data), cfg.seed, epoch)[pos * global_batch:(pos + 1) * global_batch]
            mine = dist.shard(chunk, rank, world_size)  # [B * A] example indices for this process
            batches = [collate([train_data[j] for j in mine[i * B:(i + 1) * B]]) for i in range(A)]
            counts = [int(count_fn(b)) for b in batches]
            # every *attention_mask counts: a preference batch has chosen_ and rejected_ ones
            n_inputs = sum(float(v.sum()) for b in batches for k, v in b.items() if k.endswith("attention_mask"))
            n_total, n_inputs = dist.all_reduce_sum([float(sum(counts)), n_inputs], device)
            loss_sum, metric_sums = 0.0, {}
            for i, batch in enumerate(batches):
                last = i == A - 1
                with net.no_sync() if world_size > 1 and not last else nullcontext():
                    with autocast():
                        loss, n, metrics = split_output(loss_fn(net, to_device(batch, device)))
                    if int(n) != counts[i]:
                        raise ValueError(f"loss_fn counted {int(n)} items in a batch where count_fn counted "
                                         f"{counts[i]}; pass a count_fn that matches the loss")
                    # weight n_i / N, times W because DDP averages the W processes' gradients
                    scaler.scale(loss.float() * (n * world_size / max(n_total, 1.0))).backward()
                loss_sum += float(loss.detach()) * counts[i]
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + float(v) * counts[i]
            step += 1
            names = sorted(metric_sums)
            step_loss, *values = dist.all_reduce_sum([loss_sum] + [metric_sums[k] for k in names], device)
            step_loss /= max(n_total, 1.0)
            if names:
                result.metrics[step] = {k: v / max(n_total, 1.0) for k, v in zip(names, values)}
                for k, v in result.metrics[step].items():
                    metric_window.setdefault(k, []).append(v)

            scaler.unscale_(optimizer)
            grad_norm = float(fsdp.full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))))
            if not cfg.fp16 and not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                what = f"loss is {step_loss}" if not math.isfinite(step_loss) else f"gradient norm is {grad_norm}"
                raise TrainingDiverged(f"step {step}: the training {what}; stopping. Try a lower learning_rate or "
                                       f"check the data (last good checkpoint: {result.last_checkpoint})")
            lr = optimizer.param_groups[0]["lr"]
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            with warnings.catch_warnings():  # after an fp16 skip torch warns that optimizer.step did not run
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()  # a skipped step still counts, so the schedule stays on the step count
            if after_step is not None:
                after_step(model, step)
            optimizer.zero_grad(set_to_none=True)
            if cfg.fp16 and scaler.get_scale() < scale:
                result.skipped_steps.append(step)
                msg = (f"step {step}: fp16 loss scaler skipped the update (inf/NaN gradients, loss {step_loss}); "
                       f"loss scale {scale:g} -> {scaler.get_scale():g}")
                if main:
                    tqdm.write(msg)
                log({"step": step, "skipped": True, "message": msg})
            if cfg.fp16:
                nonfinite = nonfinite + 1 if not math.isfinite(step_loss) else 0
                recent = [s for s in result.skipped_steps if s > step - FP16_WINDOW]
                too_many_skips = step >= FP16_WINDOW and len(recent) > FP16_MAX_SKIP_SHARE * FP16_WINDOW
                if nonfinite >= FP16_PATIENCE or too_many_skips:
                    why = (f"the loss was {step_loss} {nonfinite} steps in a row" if nonfinite >= FP16_PATIENCE else
                           f"the fp16 loss scaler skipped {len(recent)} of the last {FP16_WINDOW} steps")
                    first_bad = min(recent + [step - nonfinite + 1])
                    good = next((p for s, p in reversed(saved) if s < first_bad and p.exists()), None)
                    msg = (f"step {step}: {why}; the run diverged and stops, no model saved. Last good checkpoint: "
                           f"{good or 'none'}. Try a lower learning_rate, or bf16 instead of fp16")
                    log({"step": step, "stopped": True, "message": msg})
                    raise TrainingDiverged(msg)

            result.losses[step], result.global_step = step_loss, step
            if math.isfinite(step_loss):
                window.append(step_loss)
            tokens += n_inputs
            pbar.update(1)
            pbar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if step % cfg.logging_steps == 0 or step == total:
                now = time.perf_counter()
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                          "loss": sum(window) / len(window) if window else step_loss, "lr": lr,
                          "grad_norm": grad_norm, "tokens_per_s": round(tokens / max(now - t_last, 1e-9), 1)}
                record.update({k: sum(v) / len(v) for k, v in metric_window.items()})
                if device.type == "cuda":
                    record["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
                log(record)
                window, metric_window, tokens, t_last = [], {}, 0.0, now
            if val_data and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total):
                eval_loss, eval_metrics = evaluate_metrics(net if sharded else model, val_data, collate, loss_fn,
                                                           cfg.per_device_eval_batch_size or B, device, autocast)
                result.eval_losses[step] = eval_loss
                if eval_metrics:
                    result.eval_metrics[step] = eval_metrics
                log({"step": step, "epoch": round(step / steps_per_epoch, 4), "eval_loss": eval_loss,
                     **{f"eval_{k}": v for k, v in eval_metrics.items()}})
                if main:
                    tqdm.write(f"step {step}: eval_loss {eval_loss:.4f}")
            if out and cfg.save_steps and step % cfg.save_steps == 0 and (main or sharded):
                info = {"epoch": step / steps_per_epoch, "steps_per_epoch": steps_per_epoch, "seed": cfg.seed}
                if sharded:  # every rank writes its own shards
                    result.last_checkpoint = fsdp.save_sharded(out, step, trained, optimizer, scheduler, scaler, info)
                else:
                    result.last_checkpoint = save_checkpoint(out, step, model, tokenizer, optimizer, scheduler, scaler,
                                                             info)
                if main:
                    prune_checkpoints(out, cfg.save_total_limit, step)
                    saved.append((step, result.last_checkpoint))
                    if cfg.plot_loss:  # keep the picture current, so a stopped run still has one
                        plot_log(result.log_path, out / PLOT_FILE)
    finally:
        pbar.close()
        if log_file:
            log_file.close()

    result.state_bytes = fsdp.held_bytes(trained, optimizer)
    if sharded:  # every rank gets the whole trained model back
        fsdp.gather_into(model, trained)
    result.runtime_s = time.perf_counter() - t_start
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
        if main:
            est = result.memory_estimate
            tqdm.write(f"peak GPU memory allocated: {result.peak_memory_bytes / 1e9:.2f} GB"
                       + (f" (estimated {est.total / 1e9:.2f} GB)" if est else "")
                       + f"; {before / 1e9:.2f} GB of it was allocated before training began")
    if main and out and cfg.plot_loss:
        result.plot_path = plot_log(result.log_path, out / PLOT_FILE)
    return result
