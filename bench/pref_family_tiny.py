"""The preference family side by side on the tiny world: DPO, IPO, ORPO, SimPO and KTO from one SFT start.

    python bench/pref_family_tiny.py                     # seeds 0 and 1, 2 epochs each (a few minutes on CPU)
    python bench/pref_family_tiny.py --seeds 0 --fast    # a smoke run: a few steps, a few prompts

Every method starts from the same SFT model (lesson 05's recipe, cached in runs/rlhf-sft-450/ and shared with
lessons 11-13), trains on the same 90% of weights/tiny/data/preference.jsonl (KTO: the same pairs split into
unpaired replies, chosen = desirable, rejected = undesirable) with the same optimiser settings, and is then
measured on the held-out prompts of eval.jsonl that the tiny world's rule can judge:

    preferred   greedy replies that are correct, end with a full stop and are not rude, all three at once
    correct     replies that contain the right answer (what SFT taught; preference data should not erase it)
    KL          KL(pi || pi_SFT) per sampled reply (temperature 1), how far the policy moved
    reference   whether the method needs reference log-probs (one extra pass over the data before training)
    weights MB  parameters held: the policy, plus a frozen reference copy for the methods that need one
    ref pass s  seconds outside the training loop: that pass, and setting up
    steps/s     optimiser steps per second of the training loop (the reference pass not included)

The settings are each method's usual ones (DPO/IPO/KTO beta 0.1; ORPO lambda 0.1; SimPO beta 2, gamma 0.5), not
tuned here. The last table says which differences between methods kept their sign across the seeds. The
shared code is minitune/classroom/pref_family.py; lesson 12's section 6 runs the same comparison.

Measured 2026-12-03, seeds 0 and 1, 2-core CPU shared with other jobs (so steps/s is rough), 111 prompts
(SFT start: preferred 0%, correct 41%, full stop 0%):

    method  preferred   correct   full stop  KL/reply   reference  steps
    DPO     34%, 32%    41%, 40%  67%, 64%   10.1, 8.8  yes        38
    IPO     32%, 35%    40%, 43%  55%, 64%    9.1, 9.2  yes        38
    ORPO    33%, 27%    34%, 28%  89%, 95%   20.7, 28.2 no         38
    SimPO   24%, 22%    25%, 23%  87%, 94%   20.4, 27.2 no         38
    KTO     37%, 37%    40%, 37%  83%, 99%   15.4, 21.3 yes        78 (each pair gives two examples)

Held at both seeds: the reference-free ORPO and SimPO move about twice as far from the SFT model (KL) and
lose correctness (41% -> 23-34%) at this learning rate, while DPO and IPO keep it; KTO ends with the most
preferred replies but took twice the steps. Two seeds are little evidence for the smaller gaps.
"""

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minitune.classroom.lesson import sft_start  # noqa: E402
from minitune.classroom.pref_family import (METHODS, behaviour, format_row, holds_across, kto_from_pairs,  # noqa: E402
                                            run_method)
from minitune.rlhf import prepare_pairs  # noqa: E402
from minitune.tiny.evaluate import ask  # noqa: E402
from minitune.tiny.tasks import reference_answer  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="weights/tiny")
    p.add_argument("--seeds", default="0,1", help="training seeds (the data order), comma-separated")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--fast", action="store_true", help="4 steps per method, every 6th prompt")
    p.add_argument("--out", default="runs/bench-pref-family")
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(1)  # a 1.9M-parameter model: one thread is fastest, and steadier on a busy machine
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    sft, tok = sft_start(SimpleNamespace(sft=None, model=args.model, device="cpu"), 450)
    data_dir = Path(args.model) / "data"
    pairs = prepare_pairs(data_dir / "preference.jsonl", tok, "chatml", cutoff_len=96, val_size=0.1, seed=0)
    kto_data = kto_from_pairs(data_dir / "preference.jsonl", pairs, tok, "chatml", cutoff_len=96)
    eval_rows = [json.loads(x) for x in (data_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    eval_rows = [r for r in eval_rows if reference_answer(r["prompt"]) is not None]
    if args.fast:
        eval_rows = eval_rows[::6]
    print(f"pairs: {pairs.report.summary()}\nKTO: {kto_data.summary()}\nheld-out prompts: {len(eval_rows)}")
    before = behaviour(eval_rows, ask(sft, tok, [r["prompt"] for r in eval_rows]))
    print(f"SFT start: preferred {before['preferred']:.0%}, correct {before['correct']:.0%}, "
          f"full stop {before['full stop']:.0%}")
    results = {}
    for seed in seeds:
        print(f"\nseed {seed}")
        print(f"{'method':8} {'preferred':>9} {'correct':>8} {'full stop':>9} {'KL/reply':>9} {'reference':>9} "
              f"{'weights MB':>10} {'steps':>6} {'steps/s':>8} {'ref pass s':>10}")
        for name in methods:
            r = results[name, seed] = run_method(name, sft, tok, pairs, kto_data, eval_rows, seed=seed,
                                                 out_dir=Path(args.out) / str(seed), learning_rate=args.lr,
                                                 epochs=args.epochs, max_steps=4 if args.fast else None)
            print(f"{format_row(name, r)} {r['reference pass s']:>10.1f}", flush=True)
    if len(seeds) > 1:
        print("\nwhich differences hold across seeds (method A vs B: the sign of A - B at every seed)")
        for key in ("preferred", "correct", "KL"):
            print(f"  {key}: {', '.join(holds_across(results, methods, seeds, key)) or 'none'}")


if __name__ == "__main__":
    main()
