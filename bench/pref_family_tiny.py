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
    steps/s     optimiser steps per second of the training loop (the reference pass not included)

The settings are each method's usual ones (DPO/IPO/KTO beta 0.1; ORPO lambda 0.1; SimPO beta 2, gamma 0.5), not
tuned here. The last table says which differences between methods kept their sign across the seeds.

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
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minitune.classroom.lesson import sft_start  # noqa: E402
from minitune.data.dataset import split_train_val  # noqa: E402
from minitune.data.kto import KTOExample, prepare_kto  # noqa: E402
from minitune.rlhf import prepare_pairs, response_kl, train_dpo, train_kto, train_orpo, train_simpo  # noqa: E402
from minitune.tiny.evaluate import ask, prompt_ids, stop_ids  # noqa: E402
from minitune.tiny.tasks import RUDE, contains_answer, reference_answer  # noqa: E402
from minitune.train import TrainConfig  # noqa: E402

METHODS = {  # name -> (stage, TrainConfig settings)
    "DPO": ("dpo", dict(pref_loss="sigmoid", pref_beta=0.1)),
    "IPO": ("dpo", dict(pref_loss="ipo", pref_beta=0.1)),
    "ORPO": ("dpo", dict(pref_loss="orpo", pref_beta=0.1)),
    "SimPO": ("dpo", dict(pref_loss="simpo", pref_beta=2.0, simpo_gamma=0.5)),
    "KTO": ("kto", dict(pref_beta=0.1)),
}


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


def behaviour(rows, replies) -> dict:
    n = len(rows)
    correct = [contains_answer(r, reference_answer(x["prompt"])) for x, r in zip(rows, replies)]
    stop = [r.rstrip().endswith((".", "。")) for r in replies]
    polite = [not any(w in r.lower() for w in RUDE) for r in replies]
    return {"preferred": sum(c and s and p for c, s, p in zip(correct, stop, polite)) / n,
            "correct": sum(correct) / n, "full stop": sum(stop) / n}


def kto_examples(records: list[dict]) -> list[KTOExample]:
    """Each pair as two unpaired replies: the chosen one desirable, the rejected one undesirable."""
    out = []
    for r in records:
        prompt = [{"role": "user", "content": r["prompt"]}]
        out += [KTOExample(prompt, r["chosen"], True), KTOExample(prompt, r["rejected"], False)]
    return out


def run_one(name, sft, tok, pairs, kto_data, seed, args, eval_rows) -> dict:
    stage, settings = METHODS[name]
    model = copy.deepcopy(sft)
    cfg = TrainConfig(stage=stage, learning_rate=args.lr, num_train_epochs=args.epochs,
                      max_steps=4 if args.fast else None, per_device_train_batch_size=16, warmup_ratio=0.1,
                      logging_steps=10, save_steps=0, output_dir=str(Path(args.out) / f"{name}-{seed}"),
                      overwrite_output_dir=True, seed=seed, device="cpu", **settings)
    start = time.perf_counter()
    if name == "KTO":
        result = train_kto(model, kto_data, cfg, tok)
    elif name == "ORPO":
        result = train_orpo(model, pairs, cfg, tok)
    elif name == "SimPO":
        result = train_simpo(model, pairs, cfg, tok)
    else:
        result = train_dpo(model, pairs, cfg, tok)
    total = time.perf_counter() - start
    after = behaviour(eval_rows, ask(model, tok, [r["prompt"] for r in eval_rows]))
    pad = tok.pad_id if tok.pad_id is not None else stop_ids(tok)[0]
    prompts = [prompt_ids(tok, r["prompt"]) for r in eval_rows]
    kl = response_kl(model, sft, prompts, stop_ids(tok), pad, max_new_tokens=24, temperature=1.0, seed=0)
    return {**after, "KL": kl["kl_per_sequence"], "reference": "yes" if stage == "kto" or
            settings["pref_loss"] in ("sigmoid", "ipo") else "no",
            "reference pass s": total - result.runtime_s, "steps/s": result.global_step / result.runtime_s,
            "steps": result.global_step}


def main():
    args = parse_args()
    torch.set_num_threads(1)  # a 1.9M-parameter model: one thread is fastest, and steadier on a busy machine
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    sft, tok = sft_start(SimpleNamespace(sft=None, model=args.model, device="cpu"), 450)
    data_dir = Path(args.model) / "data"
    pairs = prepare_pairs(data_dir / "preference.jsonl", tok, "chatml", cutoff_len=96, val_size=0.1, seed=0)
    records = [json.loads(x) for x in (data_dir / "preference.jsonl").read_text(encoding="utf-8").splitlines()]
    kto_data = prepare_kto(kto_examples(split_train_val(records, 0.1, 0)[0]), tok, "chatml", cutoff_len=96)
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
              f"{'ref pass s':>10} {'steps/s':>8} {'steps':>6}")
        for name in methods:
            r = results[name, seed] = run_one(name, sft, tok, pairs, kto_data, seed, args, eval_rows)
            print(f"{name:8} {r['preferred']:>9.0%} {r['correct']:>8.0%} {r['full stop']:>9.0%} {r['KL']:>9.2f} "
                  f"{r['reference']:>9} {r['reference pass s']:>10.1f} {r['steps/s']:>8.2f} {r['steps']:>6}", flush=True)
    if len(seeds) > 1:
        print("\nwhich differences hold across seeds (method A vs B: the sign of A - B at every seed)")
        for key in ("preferred", "correct", "KL"):
            held = []
            for i, a in enumerate(methods):
                for b in methods[i + 1:]:
                    diffs = [results[a, s][key] - results[b, s][key] for s in seeds]
                    if all(d > 0 for d in diffs) or all(d < 0 for d in diffs):
                        held.append(f"{a} {'>' if diffs[0] > 0 else '<'} {b}")
            print(f"  {key}: {', '.join(held) or 'none'}")


if __name__ == "__main__":
    main()
