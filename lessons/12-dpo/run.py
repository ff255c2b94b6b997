"""Lesson 12: direct preference optimization (DPO, 直接偏好优化) of the SFT'd tiny model, measured.

    python lessons/12-dpo/run.py                 # the shared SFT model, then DPO; well under a minute on CPU (1 thread)
    python lessons/12-dpo/run.py --fast          # CI: a few steps each, a few prompts (< 60 s)
    python lessons/12-dpo/run.py --seed 1        # another DPO training seed (default 0); the SFT start stays the same
    python lessons/12-dpo/run.py --lora          # LoRA actor: the reference is the same model with the adapter off
    python lessons/12-dpo/run.py --loss_type ipo # or hinge; --label_smoothing 0.1 for conservative DPO
    python lessons/12-dpo/run.py --sft PATH      # start from your own SFT checkpoint

1. the losses: sigmoid, label-smoothed, IPO and hinge on the same margins, computed by dpo_loss;
2. the SFT model (lesson 05's recipe, shared with lessons 11 and 13 through runs/rlhf-sft-<steps>/), and the
   preference pairs whose replies DPO scores;
3. the reference: a frozen copy of the SFT model, or (--lora) the same model with the adapter off;
4. DPO with minitune.train (reference log-probs computed once; rewards, accuracy, margin logged);
5. what changed: the preferred behaviour on held-out prompts (correct, ends with a full stop, not rude) before
   and after, the KL to the reference on the policy's own samples, and where it comes from.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from minitune.classroom.lesson import finish, section, sft_start, small_model_threads
from minitune.peft import apply_lora, count_parameters
from minitune.rlhf import (Rollout, dpo_loss, prepare_pairs, reference_logprobs, response_kl, response_logprobs,
                           train_dpo)
from minitune.tiny.evaluate import ask, prompt_ids, stop_ids
from minitune.tiny.tasks import RUDE, contains_answer, preference_score, reference_answer
from minitune.train import TrainConfig

def parse_args():
    p = argparse.ArgumentParser(description="Lesson 12: DPO on the tiny model, before and after")
    p.add_argument("--model", default="weights/tiny", help="base checkpoint folder (default weights/tiny)")
    p.add_argument("--data", default=None, help="folder with sft_alpaca.jsonl, preference.jsonl, eval.jsonl "
                                                "(default: <model>/data)")
    p.add_argument("--template", default="chatml")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: bf16 autocast with fp32 master weights")
    p.add_argument("--sft", default=None, help="an SFT checkpoint to start from (default: SFT the model here, "
                                               "cached in runs/rlhf-sft-<steps>/, shared with lessons 11 and 13)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 for models under 50M "
                   "parameters, whose small matrices gain nothing from a second thread; else torch's default)")
    p.add_argument("--fast", action="store_true", help="CI mode: a few steps and prompts (< 60 s)")
    p.add_argument("--lora", action="store_true", help="train a LoRA actor (reference = adapter switched off)")
    p.add_argument("--loss_type", default="sigmoid", choices=["sigmoid", "ipo", "hinge"])
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--label_smoothing", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=None, help="DPO learning rate (default 2e-4 full, 2e-3 LoRA)")
    p.add_argument("--epochs", type=float, default=2.0, help="DPO epochs over the pairs")
    p.add_argument("--seed", type=int, default=0, help="DPO training seed: the order of the pairs and, with --lora, "
                   "the adapter's first weights (default 0). The SFT start, the train/held-out split and the KL's "
                   "samples stay seed 0's")
    p.add_argument("--out", default="runs/lesson-12", help="where the SFT model, logs and pictures go")
    return p.parse_args()


def behaviour(rows: list[dict], replies: list[str]) -> dict:
    """The preference rule's parts, as rates over held-out prompts; 'preferred' = all three at once."""
    n = len(rows)
    correct = [contains_answer(r, reference_answer(x["prompt"])) for x, r in zip(rows, replies)]
    stop = [r.rstrip().endswith((".", "。")) for r in replies]
    polite = [not any(w in r.lower() for w in RUDE) for r in replies]
    return {"correct answer": sum(correct) / n, "ends with a full stop": sum(stop) / n, "not rude": sum(polite) / n,
            "preferred (all three)": sum(c and s and p for c, s, p in zip(correct, stop, polite)) / n,
            "mean preference_score": sum(preference_score(x["prompt"], r) for x, r in zip(rows, replies)) / n}


def dpo_losses() -> None:
    """Section 1: each loss variant on a row of margins: where it is smallest, where its gradient fades."""
    section("1. from Bradley-Terry to the DPO loss (beta = 0.1): loss per pair against the log-ratio margin m")
    m = torch.tensor([-10.0, -5.0, 0.0, 5.0, 10.0, 20.0, 40.0])
    zeros = torch.zeros_like(m)
    variants = {"sigmoid (DPO)": (0.0, "sigmoid"), "sigmoid, label_smoothing 0.1": (0.1, "sigmoid"),
                "ipo": (0.0, "ipo"), "hinge": (0.0, "hinge")}  # name -> (label_smoothing, loss_type)
    print(f"{'m = log-ratio(chosen) - log-ratio(rejected)':44}" + "".join(f"{x:>9.0f}" for x in m.tolist()))
    per_pair_of = {}
    for name, (eps, loss_type) in variants.items():  # dpo_loss returns the batch mean: one pair at a time
        per_pair_of[name] = [float(dpo_loss(m[i:i + 1], zeros[:1], zeros[:1], zeros[:1], 0.1, eps, loss_type)[0])
                             for i in range(len(m))]
        print(f"{name:44}" + "".join(f"{x:>9.3f}" for x in per_pair_of[name]))
    best = {name: float(m[min(range(len(m)), key=lambda i: per_pair_of[name][i])]) for name in variants}
    print(f"smallest loss on this row of m: {best}; IPO's target is 1/(2 beta) = {1 / (2 * 0.1):g}, "
          f"hinge is 0 from 1/beta = {1 / 0.1:g} on")


def sft_model_and_pairs(args, data_dir: Path):
    """Section 2: the SFT model DPO starts from, and the preference pairs: prompt + chosen and prompt +
    rejected, whose replies (not prompts) the log-probabilities sum over. Returns (model, tokenizer, pairs)."""
    section("2. the SFT model (监督微调, lesson 05's recipe: batch 8, learning rate 1e-3, 450 steps) and the "
            "preference pairs (偏好对)")
    model, tok = sft_start(args, 10 if args.fast else 450)
    pairs = prepare_pairs(data_dir / "preference.jsonl", tok, args.template, cutoff_len=96, val_size=0.1, seed=0)
    print(f"preference pairs (偏好对): {pairs.report.summary()}")
    first = pairs.train[0]
    print(f"one pair: prompt+chosen {tok.decode(first['chosen_input_ids'])!r}\n"
          f"          rejected     {tok.decode(first['rejected_input_ids'][-12:])!r} (last tokens)")
    return model, tok, pairs


def the_reference(args, model):
    """Section 3: pi_ref, the SFT model frozen; with --lora, no copy: the same model with the adapter off.
    Returns the reference model (None with --lora)."""
    section("3. the reference (参考模型), computed once: a frozen copy, or the LoRA adapter switched off")
    reference = copy.deepcopy(model).eval()  # pi_ref: the SFT model, frozen (LoRA: not needed, adapter off)
    if args.lora:
        # seeded here: after a cached SFT start the RNG is elsewhere than after a fresh one
        torch.manual_seed(args.seed)
        apply_lora(model, r=8, alpha=16, targets="all-linear")
        reference = None
    trainable, total = count_parameters(model)
    print(f"actor: {'LoRA r=8 on every linear layer' if args.lora else 'full'}; {trainable:,} of {total:,} "
          f"parameters train; reference: {'the same model, adapter off' if args.lora else 'a frozen copy'}")
    return reference


def train_with_the_sft_loop(args, model, tok, pairs):
    """Section 4: DPO as a loss_fn of the SFT trainer; the logged implicit rewards, accuracy and margin."""
    section(f"4. DPO ({args.loss_type}, beta {args.beta}, label_smoothing {args.label_smoothing}) with the SFT "
            f"training loop")
    lr = args.lr or (2e-3 if args.lora else 2e-4)
    cfg = TrainConfig(stage="dpo", finetuning_type="lora" if args.lora else "full", learning_rate=lr,
                      num_train_epochs=args.epochs, max_steps=4 if args.fast else None, per_device_train_batch_size=16,
                      warmup_ratio=0.1, logging_steps=2 if args.fast else 5, save_steps=0, plot_loss=True,
                      output_dir=str(Path(args.out) / "dpo"), overwrite_output_dir=True,  # a rerun replaces the last
                      bf16=args.dtype == "bfloat16", seed=args.seed, device=args.device, pref_beta=args.beta,
                      pref_loss=args.loss_type, dpo_label_smoothing=args.label_smoothing)
    result = train_dpo(model, pairs, cfg, tok)
    steps = sorted(result.metrics)
    print(f"{'step':>5} {'loss':>8} {'rewards/chosen':>15} {'rewards/rejected':>17} {'accuracy':>9} {'margin':>8}")
    shown = steps[::max(1, len(steps) // 8)]
    for s in shown + ([steps[-1]] if shown[-1] != steps[-1] else []):
        mt = result.metrics[s]
        print(f"{s:>5} {result.losses[s]:>8.4f} {mt['rewards/chosen']:>15.3f} {mt['rewards/rejected']:>17.3f} "
              f"{mt['rewards/accuracies']:>9.2f} {mt['rewards/margins']:>8.3f}")
    ev = result.eval_metrics[result.global_step]
    print(f"held-out pairs ({len(pairs.val)}): reward accuracy {ev['rewards/accuracies']:.2f}, margin "
          f"{ev['rewards/margins']:.3f}; {result.global_step} steps in {result.runtime_s:.0f} s; log {result.log_path}")


def what_changed(args, model, reference, tok, eval_rows, before_replies) -> None:
    """Section 5: the preferred behaviour before and after, the KL to the reference on the policy's own
    samples, and one reply token by token: where that KL comes from."""
    section(f"5. what changed, and what it cost: {len(eval_rows)} held-out prompts before and after DPO, "
            f"and the KL to the reference")
    before = behaviour(eval_rows, before_replies)
    after_replies = ask(model, tok, [r["prompt"] for r in eval_rows], args.template)
    after = behaviour(eval_rows, after_replies)
    print("examples (prompt -> before | after):")
    for i in range(0, len(eval_rows), max(1, len(eval_rows) // 6))[:6]:
        print(f"  {eval_rows[i]['prompt']!r} -> {before_replies[i]!r} | {after_replies[i]!r}")
    print(f"\n{'preferred behaviour on ' + str(len(eval_rows)) + ' held-out prompts':44} {'before':>8} {'after':>8}")
    for k in before:
        fmt = (lambda v: f"{v:>8.2f}") if k.startswith("mean") else (lambda v: f"{v:>8.0%}")
        print(f"{k:44} {fmt(before[k])} {fmt(after[k])}")
    pad = tok.pad_id if tok.pad_id is not None else stop_ids(tok)[0]
    prompts = [prompt_ids(tok, r["prompt"], args.template) for r in eval_rows]
    kl = response_kl(model, reference, prompts, stop_ids(tok), pad, max_new_tokens=24, temperature=1.0, seed=0)
    print(f"\nKL(pi || pi_ref) on {len(prompts)} sampled responses (temperature 1, {kl['tokens']} tokens): "
          f"{kl['kl_per_token']:.4f} nats per token, {kl['kl_per_sequence']:.3f} per response "
          f"(mean length {kl['mean_length']:.1f} tokens)")
    # Where it comes from: a held-out reply the policy now ends with a full stop, token by token. The reference
    # almost never writes "." there, so that one token costs log pi - log pi_ref nats each time it is sampled.
    i = next((i for i, r in enumerate(after_replies) if r.endswith(".")), 0)
    ids = prompt_ids(tok, eval_rows[i]["prompt"], args.template)
    reply = tok.encode(after_replies[i]) + [tok.token_to_id("<|im_end|>") or tok.eos_id]
    device = next(model.parameters()).device
    roll = Rollout(torch.tensor([ids + reply], device=device), torch.ones(1, len(ids) + len(reply), dtype=torch.long,
                   device=device), torch.ones(1, len(reply), dtype=torch.long, device=device), len(ids))
    with torch.no_grad():
        lp, rp = response_logprobs(model, roll)[0], reference_logprobs(reference, model, roll)[0]
    first = max(0, len(reply) - 12)  # a long reply: its last 12 tokens
    print(f"\n{eval_rows[i]['prompt']!r} -> {after_replies[i]!r}, token by token"
          + (f" (the last {len(reply) - first}):" if first else ":"))
    for t, tok_id in list(enumerate(reply))[first:]:
        print(f"  {tok.decode([tok_id])!r:>14}  log pi {lp[t]:7.2f}  log pi_ref {rp[t]:7.2f}  "
              f"log pi - log pi_ref {lp[t] - rp[t]:+7.2f}")


def main():
    args = parse_args()
    torch.manual_seed(0)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    data_dir = Path(args.data or Path(args.model) / "data")
    small_model_threads(args)
    dpo_losses()
    model, tok, pairs = sft_model_and_pairs(args, data_dir)
    reference = the_reference(args, model)
    eval_rows = [json.loads(x) for x in (data_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    eval_rows = [r for r in eval_rows if reference_answer(r["prompt"]) is not None]  # the rule can judge these
    if args.fast:
        eval_rows = eval_rows[::6]
    before_replies = ask(model, tok, [r["prompt"] for r in eval_rows], args.template)  # asked before DPO: section 5
    train_with_the_sft_loop(args, model, tok, pairs)
    what_changed(args, model, reference, tok, eval_rows, before_replies)
    finish("12")


if __name__ == "__main__":
    main()
