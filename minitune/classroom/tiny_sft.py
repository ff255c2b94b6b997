"""The measuring stick of lessons 06-09: lesson 05's SFT data, settings and exact-match evaluation.

Every parameter-efficient method is trained here exactly as lesson 05 trains the whole model (same
data file, split, batch size, schedule, cutoff, seed) and scored with the same
`minitune.tiny.evaluate.evaluate_tasks` on the same held-out questions; only the finetuning_type,
the learning rate and the number of epochs (PEFT_EPOCHS) change. Full fine-tuning (lesson 05's run,
lesson 05's epochs) is the baseline; because every lesson needs it, its measured result is kept in
runs/lessons-06-08/ and reused while the model, the data and the settings are the same
(`--remeasure` runs it again).

Lessons 06, 07 and 08 import it (`from minitune.classroom import tiny_sft as S`), so all three measure
the same way; lesson 09 takes LESSON_05 and LORA from it, to repeat lesson 06's LoRA run on a 4-bit base.
It lives in the package, not in a lesson's folder, so that a lesson imports it like any other module.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

import minitune
from minitune.classroom.lesson import finish, section  # noqa: F401  (the lessons' shared section timer)
from minitune.finetuning import apply_finetuning_type, training_hooks
from minitune.data import PaddingCollator, prepare_sft
from minitune.peft import count_parameters
from minitune.tiny.evaluate import evaluate_tasks
from minitune.train import TrainConfig, train
from minitune.train.trainer import planned_steps

ROOT = Path(__file__).resolve().parents[2]
# lessons/05-sft/run.py: the same split, batch, schedule, cutoff, epochs and full fine-tuning learning rate
# (tests/test_lessons_06_08.py checks that these still equal lesson 05's)
LESSON_05 = dict(stage="sft", template="chatml", cutoff_len=96, val_size=0.05, per_device_train_batch_size=8,
                 gradient_accumulation_steps=1, lr_scheduler_type="cosine", warmup_ratio=0.1, weight_decay=0.0, seed=0)
FULL_LR, EPOCHS, FAST_STEPS = 1e-3, 10.0, 3
# the parameter-efficient runs train 3x lesson 05's epochs: they move few numbers, from a start that does nothing
PEFT_EPOCHS = 30.0
# lesson 06's LoRA; lesson 09 imports it and repeats the run on a 4-bit base
LORA = dict(rank=16, alpha=32, lr=2e-3, epochs=PEFT_EPOCHS)
CACHE_VERSION = "3"  # what a kept baseline holds (3: with end_loss and contains)
TASKS = ("arithmetic", "reversal", "capital", "colour", "sound", "identity")


def parse_args(description: str, lr: float | None, extra=None, epochs: float = EPOCHS) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=str(ROOT / "weights" / "tiny"), help="checkpoint folder (default weights/tiny)")
    p.add_argument("--data", default=None, help="folder with sft_alpaca.jsonl and eval.jsonl (default: MODEL/data)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: bf16 autocast with fp32 weights, as lesson 05")
    p.add_argument("--fast", action="store_true", help=f"CI mode: {FAST_STEPS} steps per run, two questions per task")
    p.add_argument("--epochs", type=float, default=epochs, help=f"epochs of every run (default {epochs:g}; lesson 05: {EPOCHS:g})")
    p.add_argument("--lr", type=float, default=lr,
                   help=f"learning rate of the method (default: {lr if lr is not None else 'per method'})")
    p.add_argument("--remeasure", action="store_true", help="train the full fine-tuning baseline again")
    p.add_argument("--seed", type=int, default=LESSON_05["seed"],
                   help="training seed: new parameters' init and the order of examples (default 0; the "
                        "train/held-out split stays lesson 05's). Another seed measures how far a score spreads")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 for models under 50M parameters, whose small matrices gain "
                        "nothing from a second thread, as lesson 05; else torch's default)")
    if extra:
        extra(p)
    args = p.parse_args()
    torch.manual_seed(0)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model} has no config.json: build the tiny model first (python -m minitune.tiny.build)")
    return args


def load_lesson_model(args):
    """fp32 weights (AdamW needs them; --dtype bfloat16 autocasts the matmuls), as lesson 05; on CPU,
    1 thread for a small model (lesson 05's rule)."""
    model, tok = minitune.load_pretrained(args.model, device=args.device, dtype=torch.float32)
    if args.device == "cpu" and (args.threads or model.num_parameters() < 50e6):
        torch.set_num_threads(args.threads or 1)
    return model, tok


def tiny_world(args, tok):
    """(SFT data split exactly as lesson 05, the held-out questions lesson 05 asks)."""
    data_dir = Path(args.data or Path(args.model) / "data")
    data = prepare_sft(data_dir / "sft_alpaca.jsonl", tok, LESSON_05["template"], cutoff_len=LESSON_05["cutoff_len"],
                       val_size=LESSON_05["val_size"], seed=LESSON_05["seed"])
    rows = [json.loads(x) for x in (data_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    if args.fast:  # CI: two questions per task
        rows = [r for i, r in enumerate(rows) if sum(q["task"] == r["task"] for q in rows[:i]) < 2]
    return data, rows


def config(args, finetuning_type: str, lr: float, out: str, epochs: float | None = None, **peft) -> TrainConfig:
    return TrainConfig(**{**LESSON_05, "seed": args.seed}, finetuning_type=finetuning_type, learning_rate=lr,
                       num_train_epochs=epochs or args.epochs,
                       max_steps=FAST_STEPS if args.fast else None, logging_steps=5, save_steps=0, output_dir=out,
                       overwrite_output_dir=True,  # a rerun of the lesson replaces its last run in `out`
                       bf16=args.dtype == "bfloat16", device=args.device, **peft)


def sft(model, tok, data, rows, cfg: TrainConfig, after_step=None) -> dict:
    """Add cfg.finetuning_type's parameters (as `minitune train` does), train, evaluate.

    Returns {"model", "trainable", "base_params", "steps", "seconds", "loss", "eval_loss", "end_loss", "eval",
    "replies"}; after_step(model, step) runs after the method's own hook (lesson 07 records the ranks with it).
    The new parameters are drawn right after torch.manual_seed(cfg.seed), so a run does not depend on what the
    lesson drew before it.
    """
    base_params = count_parameters(model)[1]
    torch.manual_seed(cfg.seed)
    model = apply_finetuning_type(model, cfg, tok, total_steps=planned_steps(len(data.train), cfg))
    trainable = count_parameters(model)[0]
    hooks = training_hooks(model, cfg)
    if after_step is not None:
        own = hooks.get("after_step")
        hooks["after_step"] = lambda m, s: (own and own(m, s), after_step(m, s))
    result = train(model, data.train, cfg, val_data=data.val, collate=PaddingCollator(tok), tokenizer=tok, **hooks)
    # the language-model loss: AdaLoRA's logged loss also holds its regulariser, logged on its own as orth_reg
    losses = [loss - result.metrics.get(step, {}).get("orth_reg", 0.0) for step, loss in result.losses.items()]
    evaluation = evaluate_tasks(model, tok, rows, cfg.template)
    return dict(model=model, trainable=trainable, base_params=base_params, steps=result.global_step,
                seconds=result.runtime_s, loss=(losses[0], losses[-1]), eval_loss=list(result.eval_losses.values())[-1],
                end_loss=end_of_turn_loss(model, tok, data), metrics=result.metrics,
                eval={k: evaluation[k] for k in ("accuracy", "contains", "overall", "n")}, replies=evaluation["replies"])


END_OF_TURN = "<|im_end|>"  # ChatML's end of a turn, what the SFT data teaches a reply to end with


@torch.no_grad()
def end_of_turn_loss(model, tok, data) -> tuple[float, float] | None:
    """How well the model ends a reply, over the held-out SFT examples (data.val): at the positions whose
    target is <|im_end|>, (-log P(<|im_end|>), the share of them where <|im_end|> is the most likely token,
    i.e. where greedy decoding stops). None: the tokenizer has no <|im_end|>."""
    end = tok.token_to_id(END_OF_TURN)
    if end is None:
        return None
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in PaddingCollator(tok)(data.val).items()}
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])[:, :-1]  # position t predicts t + 1
    at = batch["labels"][:, 1:] == end
    logp = torch.log_softmax(logits[at].float(), dim=-1)  # [positions, vocab]
    return -logp[:, end].mean().item(), (logp.argmax(-1) == end).float().mean().item()


def _fingerprint(args, cfg: TrainConfig) -> str:
    h = hashlib.sha256()
    data_dir = Path(args.data or Path(args.model) / "data")
    for f in sorted(Path(args.model).glob("*.safetensors")) + [data_dir / "sft_alpaca.jsonl", data_dir / "eval.jsonl"]:
        h.update(f.read_bytes())
    settings = {k: getattr(cfg, k) for k in ("learning_rate", "num_train_epochs", "max_steps", "bf16", "device",
                                             *LESSON_05)}
    h.update(json.dumps(settings, sort_keys=True).encode() + torch.__version__.encode())
    h.update(CACHE_VERSION.encode())
    return h.hexdigest()[:16]


def full_baseline(args, data, rows, tok) -> dict | None:
    """Lesson 05's full fine-tuning, measured here or read back from an earlier measurement with the
    same model, data and settings. None in --fast mode (a few steps compare nothing; CI saves the time)."""
    if args.fast:
        print("--fast: no full fine-tuning baseline (a few steps of it would compare nothing)")
        return None
    if args.epochs != EPOCHS:
        print(f"(the parameter-efficient runs here train {args.epochs:g} epochs; full fine-tuning, the baseline, "
              f"lesson 05's {EPOCHS:g})")
    cfg = config(args, "full", FULL_LR, str(ROOT / "runs" / "lessons-06-08" / "full"), epochs=EPOCHS)  # lesson 05's
    cache = ROOT / "runs" / "lessons-06-08" / f"full-ft-{_fingerprint(args, cfg)}.json"
    if cache.exists() and not args.remeasure:
        run = json.loads(cache.read_text())
        print(f"full fine-tuning, measured {run['when']} on this model/data/settings ({run['steps']} steps, "
              f"{run['seconds']:.0f} s); kept in {cache.relative_to(ROOT)} (--remeasure runs it again)")
        return run
    model, _ = load_lesson_model(args)
    run = sft(model, tok, data, rows, cfg)
    run.pop("model")
    run["when"] = time.strftime("%Y-%m-%d %H:%M")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({k: v for k, v in run.items() if k != "metrics"}, indent=1))
    print(f"full fine-tuning measured now: {run['steps']} steps in {run['seconds']:.0f} s")
    return run


def print_runs(runs: dict[str, dict | None]):
    """Exact match per task, and what each run trained, side by side (runs that are None are left out)."""
    runs = {k: v for k, v in runs.items() if v is not None}
    names = list(runs)
    width = max(14, *(len(n) for n in names))
    print(f"{'task (exact match, 完全匹配)':28}{'n':>5}" + "".join(f"{n:>{width + 2}}" for n in names))
    first = runs[names[0]]["eval"]
    for task in TASKS:
        if task in first["accuracy"]:
            print(f"{task:30}{first['n'][task]:>5}"
                  + "".join(f"{runs[n]['eval']['accuracy'][task]:>{width + 2}.0%}" for n in names))
    total = sum(first["n"].values())
    print(f"{'all held-out questions':30}{total:>5}"
          + "".join(f"{runs[n]['eval']['overall']:>{width + 2}.1%}" for n in names))
    anywhere = {n: sum(runs[n]["eval"]["contains"][t] * first["n"][t] for t in first["n"]) / total for n in names}
    print(f"{'  answer anywhere in the reply':35}" + "".join(f"{anywhere[n]:>{width + 2}.1%}" for n in names))
    print(f"{'trainable parameters':35}" + "".join(f"{runs[n]['trainable']:>{width + 2},}" for n in names))
    print(f"{'  % of the base model':35}"
          + "".join(f"{100 * runs[n]['trainable'] / runs[n]['base_params']:>{width + 1}.2f}%" for n in names))
    print(f"{'steps, seconds':35}" + "".join(f"{str(runs[n]['steps']) + ', ' + format(runs[n]['seconds'], '.0f'):>{width + 2}}"
                                             for n in names))
    print(f"{'training loss first -> last':35}"
          + "".join(f"{format(runs[n]['loss'][0], '.2f') + '->' + format(runs[n]['loss'][1], '.2f'):>{width + 2}}"
                    for n in names))
    print(f"{'held-out SFT loss after training':35}" + "".join(f"{runs[n]['eval_loss']:>{width + 2}.2f}" for n in names))
    ends = {n: runs[n]["end_loss"] for n in names}  # (-log P(<|im_end|>), share where it is the top token)
    print(f"{'end of reply: -log P(' + END_OF_TURN + ')':35}"
          + "".join(f"{'-' if ends[n] is None else format(ends[n][0], '.2f'):>{width + 2}}" for n in names))
    print(f"{'  ' + END_OF_TURN + ' is the top token':35}"
          + "".join(f"{'-' if ends[n] is None else format(ends[n][1], '.0%'):>{width + 2}}" for n in names))


def verdict(name: str, run: dict, full: dict | None, tolerance: float = 0.02):
    """One measured sentence: did `name` reach full fine-tuning's overall exact match?"""
    if full is None:
        print(f"{name}: {run['eval']['overall']:.1%} exact match after {run['steps']} steps (--fast: no baseline, "
              f"and too few steps to mean anything)")
        return
    a, b = run["eval"]["overall"], full["eval"]["overall"]
    frac = 100 * run["trainable"] / run["base_params"]
    said = "reaches" if a >= b - tolerance else "falls short of"
    print(f"{name} {said} full fine-tuning: {a:.1%} vs {b:.1%} exact match "
          f"(within {tolerance:.0%} counts as reaching), training {frac:.2f}% of the parameters")
    if run["steps"] <= FAST_STEPS:
        print(f"(only {run['steps']} steps in --fast mode: these accuracies say nothing; run without --fast)")
