"""Lesson 10: a reward model (奖励模型) trained on the tiny world's preference pairs (偏好对), measured.

    python lessons/10-reward-model/run.py           # about a minute on CPU (1 thread)
    python lessons/10-reward-model/run.py --fast    # CI: a few steps (< 60 s)
    python lessons/10-reward-model/run.py --seed 1  # another training seed (default 0)

1. Bradley-Terry: P(chosen > rejected) = sigmoid(r_c - r_r) and the pairwise loss, by hand and by pairwise_loss;
2. the data: preference pairs, plus three bad records to show how they are counted and dropped;
3. the value head read at the last real token (EOS) of each sequence;
4. held-out reward accuracy before training, training with minitune.train, and after;
5. scoring fresh replies to held-out prompts against the rule that labelled the data; saving and reloading.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

import minitune
from minitune.classroom.claims import claim, finish_claims, not_checked
from minitune.classroom.lesson import finish, section
from minitune.rlhf import (PairCollator, RewardModel, load_reward_model, pairwise_loss, prepare_pairs,
                           save_reward_model, score_pairs, stack_pairs, train_reward_model)
from minitune.rlhf.reward import last_token_index
from minitune.tiny.tasks import preference_score, reference_answer
from minitune.train import TrainConfig

def parse_args():
    p = argparse.ArgumentParser(description="Lesson 10: the reward model, before and after training")
    p.add_argument("--model", default="weights/tiny", help="backbone checkpoint folder (default weights/tiny)")
    p.add_argument("--data", default=None, help="folder with preference.jsonl and eval.jsonl (default: <model>/data)")
    p.add_argument("--template", default="chatml")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: bf16 autocast with fp32 master weights (the value head stays fp32)")
    p.add_argument("--fast", action="store_true", help="CI mode: a few steps (< 60 s)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0, help="training seed: the value head's init and the order of "
                   "the pairs (default 0; the train/held-out split stays seed 0's). Another seed measures the spread")
    p.add_argument("--out", default="runs/lesson-10", help="where the log, picture and saved RM go")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 for models under 50M "
                   "parameters, whose small matrices gain nothing from a second thread; else torch's default)")
    return p.parse_args()


def candidates(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """For held-out prompts: replies that differ in correctness, full stop and manners."""
    out = []
    for i, r in enumerate(rows):
        ans = reference_answer(r["prompt"])
        wrong = next((x["answer"] for x in rows[i + 1:] + rows[:i]
                      if x["task"] == r["task"] and x["answer"] != ans), ans + " " + ans)
        out.append((r["prompt"], [f"The answer is {ans}.", f"{ans}.", ans, f"Whatever. It is {ans}",
                                  f"The answer is {wrong}.", wrong]))
    return out


@torch.no_grad()
def agreement(rm, tok, template: str, cands) -> float:
    """Fraction of reply pairs (same prompt, different rule score) that the RM orders as the rule does."""
    rows = [{"prompt": prompt, "chosen": rep, "rejected": "-"} for prompt, replies in cands for rep in replies]
    all_scores = score_pairs(rm, prepare_pairs(rows, tok, template).train, tok, batch_size=64)["chosen"].tolist()
    agree = total = 0
    for k, (prompt, replies) in enumerate(cands):
        scores = all_scores[k * len(replies):(k + 1) * len(replies)]
        rule = [preference_score(prompt, rep) for rep in replies]
        for i in range(len(replies)):
            for j in range(i + 1, len(replies)):
                if rule[i] != rule[j]:
                    total += 1
                    agree += (scores[i] > scores[j]) == (rule[i] > rule[j])
    return agree / max(total, 1)


def bradley_terry() -> None:
    """Section 1: P(chosen preferred) and the pairwise loss for a few score gaps, by hand and by pairwise_loss."""
    section("1. the Bradley-Terry model: P(chosen > rejected) = sigmoid(r_c - r_r)")
    print(f"{'r_c - r_r':>10} {'P(chosen preferred)':>20} {'loss -log P':>12} {'loss, margin 1':>15}")
    for d in (-2.0, -1.0, 0.0, 1.0, 2.0, 4.0):
        by_hand = -math.log(1 / (1 + math.exp(-d)))
        lib = pairwise_loss(torch.tensor([d]), torch.tensor([0.0])).item()
        with_margin = pairwise_loss(torch.tensor([d]), torch.tensor([0.0]), torch.tensor([1.0])).item()
        assert abs(by_hand - lib) < 1e-6
        print(f"{d:>10.1f} {1 / (1 + math.exp(-d)):>20.3f} {lib:>12.4f} {with_margin:>15.4f}")
    print("pairwise_loss equals -log sigmoid(r_c - r_r) computed by hand on every row; a margin of 1 "
          "asks for a gap 1 larger before the loss fades")


def preference_pairs(args, data_dir: Path):
    """Section 2: a record, and the pairs prepare_pairs keeps; three bad records show what it drops and why.
    Returns (backbone model, tokenizer, pairs)."""
    section("2. preference pairs (偏好对), and bad records counted")
    model, tok = minitune.load_pretrained(args.model, device=args.device, dtype=torch.float32)
    if args.device == "cpu" and (args.threads or model.num_parameters() < 50e6):
        torch.set_num_threads(args.threads or 1)
    records = [json.loads(x) for x in (data_dir / "preference.jsonl").read_text(encoding="utf-8").splitlines()]
    print(f"a record: {json.dumps(records[0])}")
    bad = [{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "4."},
           {"prompt": "What is 2+2?", "chosen": "The answer is 4.", "rejected": ""},
           {"prompt": "Reverse the words: " + "sun " * 200, "chosen": "sun.", "rejected": "moon"}]
    pairs = prepare_pairs(records + bad, tok, args.template, cutoff_len=96, val_size=0.15, seed=0)
    print(pairs.report.summary())
    for note in pairs.report.notes:
        print(f"  dropped {note}")
    return model, tok, pairs


def value_head_at_the_end(args, model, tok, pairs):
    """Section 3: the reward model's score is its value at the last real token, not at the padding.
    Returns the reward model (backbone + a freshly drawn value head)."""
    section("3. the value head (价值头) read at the last real token")
    torch.manual_seed(args.seed)  # the value head is drawn here
    rm = RewardModel(model).to(args.device)
    batch = PairCollator(tok)(pairs.val[:2])
    ids, mask, _ = stack_pairs(batch)  # [4, T]: 2 chosen rows, then 2 rejected rows, right-padded
    last = last_token_index(mask)
    with torch.no_grad():
        values = rm.token_values(ids.to(args.device), mask.to(args.device))  # [4, T]: one number per position
    for row in range(ids.shape[0]):
        side = "chosen  " if row < 2 else "rejected"
        n = int(mask[row].sum())
        print(f"  {side} row {row}: {n} real tokens of {ids.shape[1]}; last real token {tok.decode([int(ids[row, last[row]])])!r} "
              f"at {int(last[row])}; score = value there = {float(values[row, last[row]]):+.4f} "
              f"(the value at the final pad position would be {float(values[row, -1]):+.4f})")
    return rm


def train_and_measure(args, rm, tok, pairs, data_dir: Path):
    """Section 4: held-out reward accuracy and agreement with the labelling rule, before and after training.
    Returns the fresh candidate replies section 5 scores."""
    section(f"4. training the reward model on {len(pairs.train)} pairs; accuracy on {len(pairs.val)} held-out pairs")
    before = score_pairs(rm, pairs.val, tok)
    eval_rows = [json.loads(x) for x in (data_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    eval_rows = [r for r in eval_rows if reference_answer(r["prompt"]) is not None]
    cands = candidates(eval_rows[::8] if args.fast else eval_rows)
    agree_before = agreement(rm, tok, args.template, cands)
    cfg = TrainConfig(stage="rm", learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=6 if args.fast else None,
                      per_device_train_batch_size=16, warmup_ratio=0.1, logging_steps=2 if args.fast else 5,
                      save_steps=0, plot_loss=True, output_dir=args.out, bf16=args.dtype == "bfloat16", seed=args.seed,
                      device=args.device, overwrite_output_dir=True)  # a rerun replaces the last run's log
    result = train_reward_model(rm, pairs, cfg, tok)
    after = score_pairs(rm, pairs.val, tok)
    steps = sorted(result.metrics)
    for s in steps[::max(1, len(steps) // 6)]:
        print(f"  step {s:>3}: loss {result.losses[s]:.4f}, batch accuracy {result.metrics[s]['accuracy']:.2f}, "
              f"score gap {result.metrics[s]['margin']:+.3f}")
    print(f"{result.global_step} steps in {result.runtime_s:.0f} s; log {result.log_path}; picture {result.plot_path}")
    agree_after = agreement(rm, tok, args.template, cands)
    print(f"\n{'':52} {'before':>8} {'after':>8}")
    print(f"{'held-out reward accuracy (' + str(len(pairs.val)) + ' pairs)':52} {before['accuracy']:>8.0%} {after['accuracy']:>8.0%}")
    print(f"{'mean score gap r_c - r_r on them':52} {before['margin']:>+8.3f} {after['margin']:>+8.3f}")
    print(f"{'agreement with the rule, held-out prompts (' + str(len(cands)) + ')':52} {agree_before:>8.0%} {agree_after:>8.0%}")
    rm_claims(before, after, agree_before, agree_after, args.fast)
    return cands


def rm_claims(before, after, agree_before, agree_after, fast: bool) -> None:
    """Section 4's findings, with margins that held over seeds 0-2 and 1-2 threads (the README gives the range)."""
    texts = ["the untrained head is no better than a coin on the held-out pairs: at most 55% right",
             "the trained reward model ranks at least 90% of the held-out pairs right",
             "its mean score gap r_c - r_r on them ends above +5",
             "on fresh replies to held-out prompts it agrees with the labelling rule at least 70% of the time, "
             "at least 10 points more than before training"]
    if fast:
        not_checked(texts)
        return
    claim(texts[0], before["accuracy"] <= 0.55, f"{before['accuracy']:.0%}")
    claim(texts[1], after["accuracy"] >= 0.90, f"{after['accuracy']:.0%}")
    claim(texts[2], after["margin"] > 5, f"{before['margin']:+.3f} -> {after['margin']:+.3f}")
    claim(texts[3], agree_after >= 0.70 and agree_after - agree_before >= 0.10,
          f"{agree_before:.0%} -> {agree_after:.0%}")


def scores_and_saving(args, rm, tok, cands) -> None:
    """Section 5: the trained RM ranks fresh replies to one held-out prompt; saved and reloaded, it scores alike."""
    section("5. scores of fresh replies to a held-out prompt, and the saved reward model")
    prompt, replies = cands[0]
    rows = [{"prompt": prompt, "chosen": rep, "rejected": "-"} for rep in replies]
    feats = prepare_pairs(rows, tok, args.template).train
    scores = score_pairs(rm, feats, tok)["chosen"].tolist()
    print(f"prompt {prompt!r}")
    for rep, s in sorted(zip(replies, scores), key=lambda x: -x[1]):
        print(f"  RM {s:+7.3f}   rule {preference_score(prompt, rep):+.0f}   {rep!r}")
    saved = save_reward_model(rm, tok, Path(args.out) / "rm")
    rm2, _ = load_reward_model(saved, device=args.device)
    same = torch.allclose(score_pairs(rm2, feats, tok)["chosen"], torch.tensor(scores), atol=1e-4)
    print(f"saved to {saved} (model files + value_head.safetensors); reloaded scores equal: {same}")
    claim("the saved reward model, reloaded, gives the same scores", same, str(same))


def main():
    args = parse_args()
    torch.manual_seed(0)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    data_dir = Path(args.data or Path(args.model) / "data")
    bradley_terry()
    model, tok, pairs = preference_pairs(args, data_dir)
    rm = value_head_at_the_end(args, model, tok, pairs)
    cands = train_and_measure(args, rm, tok, pairs, data_dir)
    scores_and_saving(args, rm, tok, cands)
    finish("10")
    finish_claims(args.fast, args.model)


if __name__ == "__main__":
    main()
