"""Lesson 13: GRPO (组相对策略优化) on the tiny world's arithmetic. Read README.md beside this file.

    python lessons/13-grpo/run.py                  # the tiny model on CPU, about a minute (1 thread)
    python lessons/13-grpo/run.py --fast           # CI: tiny sizes (< 60 s)
    python lessons/13-grpo/run.py --sft PATH       # start from your own SFT checkpoint
    python lessons/13-grpo/run.py --seed 1         # another draw of prompts and samples

1. the rule reward, the arithmetic questions it checks, and the SFT of weights/tiny (or --sft) that answers
   them, shared with lessons 11 and 12 through runs/rlhf-sft-<steps>/;
2. one group: G sampled answers to one question, their rewards and advantages;
3. the loss's settings (GRPOConfig);
4. the run: accuracy on held-out sums before and after (greedy and sampled), the final KL to the reference.
"""
import argparse
import copy
import json
import re
from pathlib import Path

import torch

from minitune.classroom.claims import claim, finish_claims, not_checked
from minitune.classroom.lesson import ROOT, finish, section, sft_start, small_model_threads
from minitune.rlhf import (GRPOConfig, arithmetic_reward, group_advantages, response_kl, sample_rollout,
                           score_responses, text_reward, train_grpo)
from minitune.tiny.evaluate import ask, prompt_ids, stop_ids
from minitune.tiny.general_suite import general_ability

G = 8  # answers per question: a group
# the held-out phrasings of lesson 05's evaluation set, asked of every sum
NEW_WORDING = ("How much is {a} plus {b}?", "Tell me the sum of {a} and {b}.")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "weights" / "tiny"), help="checkpoint folder (default weights/tiny)")
    ap.add_argument("--sft", default=None, help="an SFT checkpoint to start from (default: SFT the model here, cached in runs/rlhf-sft-<steps>/)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, help="float32 (default) or bfloat16: the frozen reference's dtype")
    ap.add_argument("--fast", action="store_true", help="CI mode: a few steps, a few prompts (< 60 s)")
    ap.add_argument("--out", default="runs/lesson-13", help="the GRPO log goes here")
    ap.add_argument("--seed", type=int, default=0, help="GRPOConfig.seed: which prompts and samples (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 for models under 50M "
                    "parameters, whose small matrices gain nothing from a second thread; else torch's default)")
    args = ap.parse_args()
    torch.manual_seed(0)
    return args


def pad_id(tok) -> int:
    return tok.pad_id if tok.pad_id is not None else stop_ids(tok)[0]


# --------------------------------------------------------------------------- 1
def rule_reward(args):
    """Section 1: the SFT model to train, the sums it trains on, the held-out sums it is measured on, and the
    rule that checks every answer. Returns (SFT model, tokenizer, training questions, {name: questions} of the
    measured sets, reward, reference)."""
    section("1. A rule as the reward (规则奖励): the SFT model, and the sums it is checked on")
    sft, tok = sft_start(args, 10 if args.fast else 450)  # RL fine-tunes a model that already follows instructions
    sft.eval()
    data_dir = Path(args.model) / "data"
    # Training questions: the SFT data's sums. Measured on prompts never trained on: every sum asked in eval.jsonl's
    # two held-out phrasings, for the training sums (new wording, known facts) and for eval.jsonl's held-out sums
    # (new wording, number pairs never asked about in SFT or here).
    train_q = [r["instruction"] for r in map(json.loads, (data_dir / "sft_alpaca.jsonl").read_text().splitlines())
               if r["output"].isdigit()]
    held_pairs = [tuple(map(int, re.findall(r"\d+", r["prompt"])))
                  for r in map(json.loads, (data_dir / "eval.jsonl").read_text().splitlines()) if r["task"] == "arithmetic"]
    known_q = [w.format(a=a, b=b) for q in train_q[:: 8 if args.fast else 1] for a, b in [map(int, re.findall(r"\d+", q))]
               for w in NEW_WORDING]
    held_q = [w.format(a=a, b=b) for a, b in held_pairs[:: 3 if args.fast else 1] for w in NEW_WORDING]
    sets = {"training sums, held-out wording": known_q, "held-out sums, held-out wording": held_q}
    print(f"arithmetic questions: {len(train_q)} for training (e.g. {train_q[0]!r}); measured on {len(known_q)} "
          f"training sums and {len(held_q)} held-out sums, both in held-out wording (e.g. {held_q[0]!r})")
    reward = text_reward(arithmetic_reward, tok, stop_ids(tok))
    reference = copy.deepcopy(sft).to(getattr(torch, args.dtype) if args.dtype else torch.float32).requires_grad_(False)
    return sft, tok, train_q, sets, reward, reference


# --------------------------------------------------------------------------- 2
def one_group(sft, tok, reward, train_q) -> None:
    """Section 2: G answers to one question, their rewards, and each answer's advantage within the group."""
    section("2. Group-relative advantages (组内相对优势): one group of answers, their rewards and advantages")
    stops = stop_ids(tok)
    for tries, q in enumerate(train_q[:12], 1):  # show a group with both right and wrong answers, if one comes up
        roll = sample_rollout(sft, [prompt_ids(tok, q)] * G, 8, stops, pad_id(tok), temperature=1.0, seed=0)
        scores = score_responses(reward, roll)
        if scores.std() > 0:
            break
    adv = group_advantages(scores, G)
    print(f"question {q!r} (questions tried to find a group with mixed rewards: {tries}): {G} sampled answers, "
          f"temperature 1")
    for i in range(G):
        text = tok.decode([t for t, m in zip(roll.responses[i].tolist(), roll.response_mask[i].tolist())
                           if m and t not in stops], skip_special_tokens=True).strip()
        print(f"  {text!r:24} reward {scores[i]:.0f}   advantage {adv[i]:+.3f}")
    print(f"group mean {scores.mean():.3f}, std {scores.std():.3f}: right answers get a positive advantage, wrong ones "
          f"negative; a group all right or all wrong has advantage 0 (nothing to learn). No critic needed.")
    mean = scores.mean()
    signs_agree = bool(((adv > 0) == (scores > mean)).all() and ((adv < 0) == (scores < mean)).all())
    claim("within a group, answers above the group's mean reward get a positive advantage, those below a negative "
          "one, and the advantages sum to 0", signs_agree and abs(adv.sum().item()) < 1e-4,
          f"signs agree: {signs_agree}; sum {adv.sum().item():+.1e}")


# --------------------------------------------------------------------------- 3
def the_loss(args) -> GRPOConfig:
    """Section 3: the settings of grpo_loss and of the steps around it."""
    section("3. The loss (GRPO 损失): its settings")
    cfg = GRPOConfig(steps=3 if args.fast else 40, batch_size=4 if args.fast else 16, num_generations=G,
                     mini_batch_size=32 if args.fast else 64, learning_rate=1e-4, beta=0.04, max_new_tokens=8,
                     seed=args.seed, log_path=str(Path(args.out) / "grpo.jsonl"))
    print("GRPOConfig: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in (
        "steps", "batch_size", "num_generations", "mini_batch_size", "num_iterations", "learning_rate", "beta",
        "cliprange", "max_new_tokens", "temperature", "seed")))
    return cfg


# --------------------------------------------------------------------------- 4
def accuracy(model, tok, reward, questions, n_samples=4):
    """(greedy accuracy, sampled accuracy at temperature 1 with n_samples per question, greedy replies)."""
    reps = ask(model, tok, questions, max_new_tokens=8)
    greedy = sum(arithmetic_reward(q, r) for q, r in zip(questions, reps)) / len(questions)
    roll = sample_rollout(model, [prompt_ids(tok, q) for q in questions for _ in range(n_samples)], 8, stop_ids(tok),
                          pad_id(tok), seed=2)
    return greedy, score_responses(reward, roll).mean().item(), reps


def heldout_kl(model, reference, tok, questions, n_samples=4) -> float:
    """Sequence KL(pi || pi_ref) on held-out prompts: log pi - log pi_ref summed over each sampled answer, averaged
    (minitune.rlhf.response_kl, lesson 12's measure; one batch, so one seeded draw of all the samples)."""
    rows = [prompt_ids(tok, q) for q in questions for _ in range(n_samples)]
    kl = response_kl(model, reference, rows, stop_ids(tok), pad_id(tok), max_new_tokens=8, seed=1, batch_size=len(rows))
    return kl["kl_per_sequence"]


def general_suite(model, tok, fast: bool) -> float:
    """The tiny world's general-ability suite (minitune/tiny/general_suite.py, lesson 05's alignment tax): 88
    four-choice questions no stage trains on, each option scored by its log-likelihood. --fast: 3 per subject."""
    return general_ability(model, tok, per_subject_limit=3 if fast else None)


def the_run(sft, tok, reward, reference, train_q, sets, cfg, fast: bool = False) -> None:
    """Section 4: GRPO on the training sums; the step table, the measured sets before and after, the KL to the
    reference and the greedy answers that changed. Returns (before, after, KL, (first, last) mean reward,
    (before, after) general-ability suite)."""
    section("4. The run: GRPO on arithmetic, accuracy on held-out sums before and after, and the KL to the reference")
    before = {name: accuracy(sft, tok, reward, qs) for name, qs in sets.items()}
    actor = copy.deepcopy(sft)
    records = train_grpo(actor, reference, reward, [prompt_ids(tok, x) for x in train_q], cfg, stop_ids(tok), pad_id(tok))
    after = {name: accuracy(actor, tok, reward, qs) for name, qs in sets.items()}
    held_q = sets["held-out sums, held-out wording"]
    kl = heldout_kl(actor, reference, tok, held_q)
    suite = (general_suite(sft, tok, fast), general_suite(actor, tok, fast))
    print(f"\n{'step':>4} {'reward (sampled accuracy)':>26} {'KL':>6} {'flat groups':>12} {'length':>7}")
    for rec in [records[i] for i in sorted({*range(0, len(records), max(1, len(records) // 8)), len(records) - 1})]:
        print(f"{rec['step']:>4} {rec['reward']:26.3f} {rec['kl']:6.3f} {rec['flat_groups']:12.2f} "
              f"{rec['response_length']:7.1f}")
    quarter = max(1, len(records) // 4)
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (records[:quarter], records[-quarter:]))
    print(f"mean reward of the first {quarter} steps {first:.3f}, of the last {quarter} steps {last:.3f}")
    print(f"\n{'':48}before (SFT)   after (GRPO)")
    for name, qs in sets.items():
        (a0, q0, _), (a1, q1, _) = before[name], after[name]
        print(f"{name} ({len(qs)} questions)")
        print(f"  greedy accuracy                               {a0:>10.0%}   {a1:>10.0%}")
        print(f"  sampled accuracy (temperature 1, 4 each)      {q0:>10.0%}   {q1:>10.0%}")
    print(f"KL(pi || pi_ref) on held-out sums, sampled, nats per answer {0.0:.2f} -> {kl:.2f}")
    print(f"general-ability suite (alignment tax, 对齐税): {suite[0]:.1%} -> {suite[1]:.1%} (the SFT start -> after "
          f"GRPO; four-choice questions no stage trains on; the base model before SFT: lesson 05)")
    reps0, reps1 = before[name][-1], after[name][-1]  # the held-out sums
    changed = [(q, b, a) for q, b, a in zip(held_q, reps0, reps1) if b != a]
    right = [arithmetic_reward(q, a) for q, _, a in changed]
    wrong = [arithmetic_reward(q, b) for q, b, _ in changed]
    print(f"{len(changed)} of {len(held_q)} greedy answers changed: {sum(right):.0f} became right, {sum(wrong):.0f} "
          f"became wrong, {len(changed) - sum(right) - sum(wrong):.0f} stayed wrong; the first six (before -> after):")
    for q, b, a in changed[:6]:
        print(f"  {q!r:40} {b!r:10} -> {a!r}")
    print(f"log: {cfg.log_path}")
    return before, after, kl, (first, last), suite


def grpo_claims(before, after, kl, rewards, fast: bool) -> None:
    """Section 4's findings, with margins that held over seeds 0-2 and 1-2 threads (the README gives the range).
    before/after: {set name: (greedy accuracy, sampled accuracy, replies)}."""
    texts = ["the mean reward on the training batches rises: the last quarter of the steps beats the first by at "
             "least 0.03",
             "sampled accuracy on the training sums, asked in held-out wording, rises by at least 5 points",
             "rewarding one sum teaches little about another: on held-out sums the sampled accuracy gains less than "
             "on the training sums",
             "the policy stays near the reference: KL below 1 nat per sampled answer"]
    if fast:
        not_checked(texts)
        return
    known, held = "training sums, held-out wording", "held-out sums, held-out wording"
    gain_known, gain_held = after[known][1] - before[known][1], after[held][1] - before[held][1]
    claim(texts[0], rewards[1] - rewards[0] >= 0.03, f"{rewards[0]:.3f} -> {rewards[1]:.3f}")
    claim(texts[1], gain_known >= 0.05, f"{before[known][1]:.0%} -> {after[known][1]:.0%}")
    claim(texts[2], gain_held < gain_known, f"held-out {gain_held:+.0%} vs training sums {gain_known:+.0%}")
    claim(texts[3], kl < 1.0, f"{kl:.2f} nats per answer")


def alignment_tax_claim(suite, fast: bool) -> None:
    """GRPO's tax on top of SFT's, with a margin from seeds 0-2 (README); --fast's few steps are not checked."""
    text = "GRPO adds little alignment tax to SFT's: the general-ability suite moves by at most 8 points"
    if fast:
        not_checked([text])
        return
    claim(text, abs(suite[1] - suite[0]) <= 0.08, f"{suite[0]:.1%} -> {suite[1]:.1%}")


def main():
    args = parse_args()
    small_model_threads(args)
    sft, tok, train_q, sets, reward, reference = rule_reward(args)
    one_group(sft, tok, reward, train_q)
    cfg = the_loss(args)
    before, after, kl, rewards, suite = the_run(sft, tok, reward, reference, train_q, sets, cfg, args.fast)
    finish("13")
    grpo_claims(before, after, kl, rewards, args.fast)
    alignment_tax_claim(suite, args.fast)
    finish_claims(args.fast, args.model)


if __name__ == "__main__":
    main()
