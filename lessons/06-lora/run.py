"""Lesson 06: LoRA, low-rank adaptation (低秩适配), measured on the tiny model.

    python lessons/06-lora/run.py            # full: lesson 05's SFT run with LoRA instead of full fine-tuning
    python lessons/06-lora/run.py --fast     # CI: a few steps, a few questions

1. a LoRA layer: what it adds, that it starts exactly at the base model;
2. how many parameters: the tiny model and a LLaMA-7B config, formula vs count;
3. lesson 05's run with LoRA, beside the baseline, full fine-tuning as in lesson 05 (measured, or kept from an
   earlier measurement): same data and schedule, evaluated the same way;
4. merge / unmerge, and the adapter file in PEFT's layout, read back.
"""
import json
import tempfile
from pathlib import Path

import torch

from minitune.classroom import tiny_sft as S  # lesson 05's setup, shared by lessons 06-09
from minitune.classroom.claims import claim, finish_claims, not_checked
from minitune.memory import count_parameters as formula_total
from minitune.memory import lora_parameters
from minitune.model import ModelConfig
from minitune.peft import (apply_lora, count_parameters, load_adapter, merge_lora, print_trainable_parameters,
                           save_adapter, unmerge_lora)
from minitune.peft.lora import lora_layers
from minitune.tiny.general_suite import general_ability

LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, model_type="llama")
QV, ALL = ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = S.LORA["rank"], S.LORA["alpha"]  # with lr and epochs in tiny_sft.py: lesson 09 repeats this run


def lora_layer(args, model, tok) -> str:
    """Section 1: wrap every linear layer; B = 0, so the logits do not move. Returns the first layer's name."""
    S.section("1. a LoRA layer (LoRA 层): h = W0 x + (alpha / r) B A x")
    ids = torch.tensor([tok.encode("The capital of Norway is")], device=args.device)
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, RANK, ALPHA, targets="all-linear")
    name, layer = next(iter(lora_layers(model).items()))
    print(f"{name}: {layer}")
    print(f"  W0 {list(layer.base_layer.weight.shape)} frozen; A {list(layer.lora_A.weight.shape)} "
          f"(Kaiming-uniform), B {list(layer.lora_B.weight.shape)} (zeros), scaling alpha/r = {layer.scaling:g}")
    with torch.no_grad():
        after = model(ids)
    print(f"  B = 0, so the wrapped model starts exactly at the base model: max |logit difference| = "
          f"{(after - before).abs().max().item():.1e}")
    print_trainable_parameters(model)
    return name


def how_many_parameters(args, model) -> None:
    """Section 2: r (in + out) per adapted layer, by formula, counted on a wrapped fresh model too."""
    S.section("2. how many parameters (参数量): r (in + out) per adapted layer instead of in x out")
    tiny_cfg = model.config
    base_total = count_parameters(model)[1] - count_parameters(model)[0]
    print(f"{'adapted layers, rank':32}{'tiny: formula':>15}{'counted':>11}{'% of model':>11}"
          f"{'LLaMA-7B: formula':>20}{'% of model':>11}")
    print(f"{'full fine-tuning':32}{formula_total(tiny_cfg):>15,}{base_total:>11,}{100:>10.0f}%"
          f"{formula_total(LLAMA_7B):>20,}{100:>10.0f}%")
    for targets, r in ((QV, 8), (ALL, 8), (ALL, 16), (ALL, 64)):
        fresh, _ = S.load_lesson_model(args)
        counted = count_parameters(apply_lora(fresh, r, 2 * r, targets=list(targets)))[0]
        tiny, big = lora_parameters(tiny_cfg, r, targets), lora_parameters(LLAMA_7B, r, targets)
        assert tiny == counted, (targets, r, tiny, counted)
        label = f"{'q,v' if targets == QV else 'all linear'}, r={r}"
        print(f"{label:32}{tiny:>15,}{counted:>11,}{100 * tiny / base_total:>10.2f}%"
              f"{big:>20,}{100 * big / formula_total(LLAMA_7B):>10.3f}%")
    print("(the 7B column is the formula only; the tiny column is also counted on the wrapped model)")


def lora_vs_full(args, tok) -> dict:
    """Section 3: the base model where a reply should end, the full fine-tuning baseline (lesson 05's run),
    then the same run with LoRA; the table side by side. Returns (the LoRA run (its model is section 4's),
    the full fine-tuning run (None in --fast mode), the base model's end-of-reply numbers)."""
    S.section(f"3. lesson 05's run with LoRA (LoRA 微调): r={RANK}, alpha={ALPHA}, every linear layer, lr {args.lr:g}, "
              f"{args.epochs:g} epochs, beside full fine-tuning (全参数微调)")
    data, rows = S.tiny_world(args, tok)
    print(f"SFT data: {data.report.summary()}; {len(rows)} held-out questions")
    fresh, _ = S.load_lesson_model(args)
    end = S.end_of_turn_loss(fresh, tok, data)
    suite_before = general_suite(fresh, tok, args.fast)
    if end is not None:
        print(f"the base model where a reply should end: -log P({S.END_OF_TURN}) = {end[0]:.2f}, the top token "
              f"at {end[1]:.0%} of those positions\n(pretraining never saw the chat template's tokens; full "
              "fine-tuning trains their embedding rows, LoRA leaves them as they are)")
    full = S.full_baseline(args, data, rows, tok)

    model, _ = S.load_lesson_model(args)
    cfg = S.config(args, "lora", args.lr, str(S.ROOT / "runs" / "lesson-06"), lora_rank=RANK, lora_alpha=ALPHA,
                   lora_target="all")
    print(f"\nthe same run on the command line: minitune train --finetuning_type lora --lora_rank {RANK} "
          f"--lora_alpha {ALPHA} --lora_target all --learning_rate {args.lr:g} --num_train_epochs {args.epochs:g} ...")
    lora = S.sft(model, tok, data, rows, cfg)
    print()
    S.print_runs({"full FT": full, f"LoRA r={RANK}": lora})
    print()
    S.verdict("LoRA", lora, full)
    lora["suite"] = (suite_before, general_suite(lora["model"], tok, args.fast))  # (base, after LoRA)
    print(f"general-ability suite (alignment tax, 对齐税): {lora['suite'][0]:.1%} -> {lora['suite'][1]:.1%} with LoRA "
          f"(four-choice questions SFT never trains, quiz format; chance 25%; full fine-tuning's: lesson 05)")
    return lora, full, end


def general_suite(model, tok, fast: bool) -> float:
    """The tiny world's general-ability suite (minitune/tiny/general_suite.py), lesson 05's alignment tax:
    accuracy by each option's log-likelihood in the quiz format pretraining wrote. --fast: 3 per subject."""
    return general_ability(model, tok, per_subject_limit=3 if fast else None)


def alignment_tax_claim(lora, fast: bool) -> None:
    """LoRA leaves W0 as it was, yet the function the model computes moves as much: the tax is paid all the same."""
    text = "LoRA does not spare general ability: the suite drops by at least 25 points, as with full SFT (lesson 05)"
    if fast:
        not_checked([text])
        return
    before, after = lora["suite"]
    claim(text, before - after >= 0.25, f"{before:.1%} -> {after:.1%}")


def lora_claims(lora, full, base_end, fast: bool) -> None:
    """Section 3's findings, with margins that held over seeds 0-2 and 1-2 threads (the README gives the range)."""
    share = lora["trainable"] / lora["base_params"]
    claim("LoRA r=16 on every linear layer trains under 15% of the model's parameters", share < 0.15,
          f"{lora['trainable']:,} of {lora['base_params']:,} ({share:.2%})")
    texts = ["LoRA reaches full fine-tuning's held-out exact match (at most 5 points below it, or above)",
             "capitals and animal sounds stay near 0% with LoRA too: at most 2 of the 36 right",
             "LoRA cannot train the untrained <|im_end|> row: -log P(<|im_end|>) at a reply's end stays above 1 "
             "(the base model's above 5, full fine-tuning's below 0.1)",
             "yet LoRA learns to stop: <|im_end|> is the top token at 95% or more of the reply ends"]
    if fast or full is None:
        not_checked(texts)
        return
    a, b = lora["eval"]["overall"], full["eval"]["overall"]
    claim(texts[0], a >= b - 0.05, f"LoRA {a:.1%} vs full fine-tuning {b:.1%}")
    acc, n = lora["eval"]["accuracy"], lora["eval"]["n"]
    facts_right = round(acc["capital"] * n["capital"] + acc["sound"] * n["sound"])
    claim(texts[1], facts_right <= 2, f"{facts_right} of {n['capital'] + n['sound']} "
                                      f"(capitals {acc['capital']:.0%}, sounds {acc['sound']:.0%})")
    lora_end, full_end = lora["end_loss"], full["end_loss"]
    claim(texts[2], lora_end[0] > 1 and base_end[0] > 5 and full_end[0] < 0.1,
          f"LoRA {lora_end[0]:.2f}, base {base_end[0]:.2f}, full fine-tuning {full_end[0]:.2f}")
    claim(texts[3], lora_end[1] >= 0.95, f"top token at {lora_end[1]:.0%} of the ends")


def merge_and_adapter_file(args, tok, model, name: str) -> None:
    """Section 4: merging changes no logit and unmerging gives W0 back; the adapter, saved and read back."""
    S.section("4. merge (合并), unmerge, and the adapter file (PEFT layout)")
    test = torch.tensor([tok.encode("Reverse the words: red blue green")], device=args.device)
    with torch.no_grad():
        y = model(test)
        w0 = model.get_submodule(name).base_layer.weight.clone()
        merge_lora(model)
        y_merged = model(test)
        unmerge_lora(model)
        w_back = model.get_submodule(name).base_layer.weight
    print(f"merged: W0 <- W0 + (alpha/r) B A; max |logit difference| {(y_merged - y).abs().max().item():.1e}; "
          f"unmerge gives W0 back to {(w_back - w0).abs().max().item():.1e}")
    scale = y.abs().max().item()  # logits differ by float rounding only: relative to their size
    claim("merging B A into W0 changes no logit, and unmerging gives W0 back (float rounding only)",
          (y_merged - y).abs().max().item() < 1e-4 * scale and (w_back - w0).abs().max().item() < 1e-5,
          f"logits {(y_merged - y).abs().max().item():.1e}, W0 {(w_back - w0).abs().max().item():.1e}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_adapter(model, Path(tmp) / "adapter", args.model)
        config = json.loads((folder / "adapter_config.json").read_text())
        size = (folder / "adapter_model.safetensors").stat().st_size
        full_size = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
        print(f"adapter_config.json: peft_type={config['peft_type']}, r={config['r']}, lora_alpha={config['lora_alpha']}, "
              f"target_modules={config['target_modules']}")
        print(f"adapter_model.safetensors: {size / 1e3:.0f} kB (the model file: {full_size / 1e3:.0f} kB); "
              f"a tensor name: {next(iter(tensor_names(folder)))}")
        fresh, _ = S.load_lesson_model(args)
        with torch.no_grad():
            y_loaded = load_adapter(fresh, folder).eval()(test)
        print(f"read back into a fresh base model: max |logit difference| {(y_loaded - y).abs().max().item():.1e}")
        claim("the adapter file is under a third of the model file and, read back, gives the same logits",
              size < full_size / 3 and (y_loaded - y).abs().max().item() < 1e-4 * scale,
              f"{size / 1e3:.0f} kB of {full_size / 1e3:.0f} kB; logits {(y_loaded - y).abs().max().item():.1e}")
    print("`minitune chat --model MODEL --adapter runs/...` puts such a folder on a model; "
          "peft.PeftModel.from_pretrained reads it too")


def tensor_names(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return list(f.keys())


def main():
    args = S.parse_args("Lesson 06: LoRA", lr=S.LORA["lr"], epochs=S.LORA["epochs"])
    model, tok = S.load_lesson_model(args)
    name = lora_layer(args, model, tok)
    how_many_parameters(args, model)
    lora, full, base_end = lora_vs_full(args, tok)
    lora_claims(lora, full, base_end, args.fast)
    merge_and_adapter_file(args, tok, lora["model"].eval(), name)
    alignment_tax_claim(lora, args.fast)  # section 3's, checked last: the README numbers it 8
    S.finish("06")
    finish_claims(args.fast, args.model)


if __name__ == "__main__":
    main()
