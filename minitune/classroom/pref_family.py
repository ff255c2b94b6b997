"""The preference family side by side: DPO, IPO, ORPO, SimPO and KTO from one SFT start, on the same data.

Each method turns the same preference pairs (x, y_w chosen, y_l rejected) into a loss; what differs is
what the loss compares and whether it needs the reference policy pi_ref (the SFT model, frozen):

    DPO   (Rafailov et al. 2023)  -log sigmoid(beta [log pi/pi_ref (y_w) - log pi/pi_ref (y_l)])   summed log-probs
    IPO   (Azar et al. 2023)      (m - 1/(2 beta))^2, m the same log-ratio margin on per-token AVERAGED log-probs
    ORPO  (Hong et al. 2024)      NLL(y_w) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l))  no pi_ref
    SimPO (Meng et al. 2024)      -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)  no pi_ref
    KTO   (Ethayarajh et al. 2024) each reply alone, labelled desirable (y_w) or undesirable (y_l), valued
                                  against z0, a KL estimate: 1 - sigmoid(beta (r - z0)) or 1 - sigmoid(beta (z0 - r))

(the losses themselves: minitune/rlhf/dpo.py, orpo.py, simpo.py, kto.py). Here every method starts from a
copy of the same SFT model, trains with the same optimiser settings on the same training pairs (KTO: the
same pairs split in two, :func:`kto_examples`), and is then measured on held-out prompts:

    preferred   greedy replies that are correct, end with a full stop and are not rude (all three)
    correct     greedy replies containing the right answer: what SFT taught, and preference data should keep
    KL          KL(pi || pi_SFT) per sampled reply (temperature 1, the k1 estimate): how far the policy moved
    weights     bytes of parameters the method holds: the policy, plus a frozen reference copy for the methods
                that need pi_ref (TRL keeps one in memory; minitune computes its log-probs in one pass before
                training, after which the copy may go, but the pass and the copy are still the price)
    steps/s     optimiser steps per second of the training loop (the reference pass not included)

Used by lesson 12 (section 6) and bench/pref_family_tiny.py. The settings are each method's usual ones
(DPO/IPO/KTO beta 0.1; ORPO lambda 0.1; SimPO beta 2, gamma 0.5), not tuned on this data.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from minitune.data.dataset import split_train_val
from minitune.data.kto import KTOData, KTOExample, prepare_kto
from minitune.rlhf import PairData, response_kl, train_dpo, train_kto, train_orpo, train_simpo
from minitune.tiny.evaluate import ask, prompt_ids, stop_ids
from minitune.tiny.tasks import RUDE, contains_answer, reference_answer
from minitune.train import TrainConfig

__all__ = ["METHODS", "REFERENCE_FREE", "needs_reference", "kto_examples", "kto_from_pairs", "behaviour",
           "weight_bytes", "train_method", "measure", "run_method", "row_costs", "HEADER", "format_row",
           "holds_across"]

# name -> (stage, TrainConfig settings: LLaMA-Factory's keys)
METHODS = {
    "DPO": ("dpo", dict(pref_loss="sigmoid", pref_beta=0.1)),
    "IPO": ("dpo", dict(pref_loss="ipo", pref_beta=0.1)),
    "ORPO": ("dpo", dict(pref_loss="orpo", pref_beta=0.1)),  # pref_beta is ORPO's lambda
    "SimPO": ("dpo", dict(pref_loss="simpo", pref_beta=2.0, simpo_gamma=0.5)),
    "KTO": ("kto", dict(pref_beta=0.1)),
}
REFERENCE_FREE = ("ORPO", "SimPO")  # no pi_ref in the loss: nothing to compute before training, no copy to hold


def needs_reference(name: str) -> bool:
    return name not in REFERENCE_FREE


def kto_examples(records: list[dict]) -> list[KTOExample]:
    """Each pair as two unpaired replies: the chosen one desirable, the rejected one undesirable."""
    out = []
    for r in records:
        prompt = [{"role": "user", "content": r["prompt"]}]
        out += [KTOExample(prompt, r["chosen"], True), KTOExample(prompt, r["rejected"], False)]
    return out


def kto_from_pairs(path: Path, pairs: PairData, tokenizer, template: str = "chatml", cutoff_len: int = 96,
                   val_size: float = 0.1, seed: int = 0) -> KTOData:
    """KTO data from the same training pairs as `pairs` (prepare_pairs with the same val_size and seed).

    prepare_pairs splits the pairs it kept, so splitting the file's records the same way picks the same
    pairs only when it dropped none; the tiny world's file has no bad pair, and this checks it."""
    records = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    if len(records) != len(pairs.train) + len(pairs.val):
        raise ValueError(f"{path}: prepare_pairs dropped {len(records) - len(pairs.train) - len(pairs.val)} "
                         f"records, so the KTO split would not be the pairs' split")
    train_records = split_train_val(records, val_size, seed)[0]
    return prepare_kto(kto_examples(train_records), tokenizer, template, cutoff_len=cutoff_len)


def behaviour(rows: list[dict], replies: list[str]) -> dict:
    """Rates over the held-out prompts: the preference rule's parts, and all three at once."""
    n = len(rows)
    correct = [contains_answer(r, reference_answer(x["prompt"])) for x, r in zip(rows, replies)]
    stop = [r.rstrip().endswith((".", "。")) for r in replies]
    polite = [not any(w in r.lower() for w in RUDE) for r in replies]
    return {"preferred": sum(c and s and p for c, s, p in zip(correct, stop, polite)) / n,
            "correct": sum(correct) / n, "full stop": sum(stop) / n}


def weight_bytes(model) -> int:
    """Bytes of the model's parameters (a tied embedding counted once, as parameters() yields it once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def train_method(name: str, model, tokenizer, pairs: PairData, kto: KTOData, cfg: TrainConfig):
    """One method's training on `model` in place (its reference, if any: `model` as it is now)."""
    if name == "KTO":
        return train_kto(model, kto, cfg, tokenizer)
    if name == "ORPO":
        return train_orpo(model, pairs, cfg, tokenizer)
    if name == "SimPO":
        return train_simpo(model, pairs, cfg, tokenizer)
    return train_dpo(model, pairs, cfg, tokenizer)  # DPO and IPO: cfg.pref_loss says which


def measure(model, sft, tokenizer, eval_rows: list[dict], template: str = "chatml") -> dict:
    """Behaviour of greedy replies on eval_rows, and KL(model || sft) per sampled reply (seed 0)."""
    out = behaviour(eval_rows, ask(model, tokenizer, [r["prompt"] for r in eval_rows], template))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else stop_ids(tokenizer)[0]
    prompts = [prompt_ids(tokenizer, r["prompt"], template) for r in eval_rows]
    kl = response_kl(model, sft, prompts, stop_ids(tokenizer), pad, max_new_tokens=24, temperature=1.0, seed=0)
    return {**out, "KL": kl["kl_per_sequence"]}


def run_method(name: str, sft, tokenizer, pairs: PairData, kto: KTOData, eval_rows: list[dict], *, seed: int,
               out_dir: str | Path, learning_rate: float = 2e-4, epochs: float = 2.0, max_steps: int | None = None,
               device: str = "cpu", bf16: bool = False, template: str = "chatml") -> dict:
    """Copy the SFT model, train it with `name`'s loss, measure it: one row of the family's table."""
    stage, settings = METHODS[name]
    model = copy.deepcopy(sft)
    cfg = TrainConfig(stage=stage, learning_rate=learning_rate, num_train_epochs=epochs, max_steps=max_steps,
                      per_device_train_batch_size=16, warmup_ratio=0.1, logging_steps=10, save_steps=0,
                      output_dir=str(Path(out_dir) / name), overwrite_output_dir=True, seed=seed, device=device,
                      bf16=bf16, **settings)
    start = time.perf_counter()
    result = train_method(name, model, tokenizer, pairs, kto, cfg)
    total = time.perf_counter() - start
    return {**measure(model, sft, tokenizer, eval_rows, template), **row_costs(name, sft, result, total)}


def row_costs(name: str, sft, result, total_s: float | None = None) -> dict:
    """What a method costs: weights held, steps, steps/s, and the reference pass's seconds (if timed)."""
    copies = 2 if needs_reference(name) else 1  # the policy, and a frozen copy of it as pi_ref
    return {"reference": "yes" if needs_reference(name) else "no", "weights MB": copies * weight_bytes(sft) / 1e6,
            "steps": result.global_step, "steps/s": result.global_step / max(result.runtime_s, 1e-9),
            "reference pass s": None if total_s is None else total_s - result.runtime_s}


HEADER = (f"{'method':8} {'preferred':>9} {'correct':>8} {'full stop':>9} {'KL/reply':>9} {'reference':>9} "
          f"{'weights MB':>10} {'steps':>6} {'steps/s':>8}")


def format_row(name: str, r: dict) -> str:
    return (f"{name:8} {r['preferred']:>9.0%} {r['correct']:>8.0%} {r['full stop']:>9.0%} {r['KL']:>9.2f} "
            f"{r['reference']:>9} {r['weights MB']:>10.1f} {r['steps']:>6} {r['steps/s']:>8.2f}")


def holds_across(results: dict, methods: list[str], seeds: list[int], key: str) -> list[str]:
    """'A > B' for each pair of methods whose difference in `key` kept its sign at every seed."""
    held = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            diffs = [results[a, s][key] - results[b, s][key] for s in seeds]
            if all(d > 0 for d in diffs) or all(d < 0 for d in diffs):
                held.append(f"{a} {'>' if diffs[0] > 0 else '<'} {b}")
    return held

