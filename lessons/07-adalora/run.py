"""Lesson 07: AdaLoRA, adaptive rank allocation (自适应秩分配), measured on the tiny model.

    python lessons/07-adalora/run.py            # full: lesson 05's SFT run with AdaLoRA
    python lessons/07-adalora/run.py --fast     # CI: a few steps, a few questions

1. the SVD-shaped update P diag(Λ) Q, starting exactly at the base model;
2. how many parameters: AdaLoRA at init_r and LoRA, tiny model and LLaMA-7B;
3. the budget schedule (预算调度) for this run, before training;
4. the baseline (lesson 05's full fine-tuning) and AdaLoRA fine-tuning, the budget as it happened;
5. where the rank went: the final rank of every adapted layer, and the saved adapter.
"""
import json
import tempfile
from pathlib import Path

import torch

from minitune.classroom import tiny_sft as S  # lesson 05's setup, shared by lessons 06-09
from minitune.classroom.claims import claim, finish_claims, not_checked
from minitune.memory import count_parameters as formula_total
from minitune.memory import layer_linears, lora_parameters
from minitune.model import ModelConfig
from minitune.peft import AdaLoRAConfig, AdaLoRAController, apply_adalora, count_parameters, load_adapter, save_adapter
from minitune.peft.adalora import ranks, svd_layers
from minitune.train.trainer import planned_steps

LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, model_type="llama")
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INIT_R, TARGET_R = 16, 8  # LoRA in lesson 06: r = 16 everywhere


def adalora_parameters(cfg, r: int, targets=MODULES) -> int:
    """Q [r, in] + P [out, r] + Λ [r]: LoRA's r (in + out) plus r per adapted layer."""
    return lora_parameters(cfg, r, targets) + r * cfg.num_hidden_layers * len(targets)


def svd_form(args, model, tok) -> None:
    """Section 1: every linear layer wrapped in the SVD form; Λ = 0, so the logits do not move."""
    S.section("1. the SVD form (奇异值分解形式): h = W0 x + (alpha / r) P diag(Λ) Q x")
    ids = torch.tensor([tok.encode("The capital of Norway is")], device=args.device)
    with torch.no_grad():
        before = model(ids)
    # alpha = 2 * init_r, as the training run in section 4 gets it (LLaMA-Factory's default alpha = 2r)
    apply_adalora(model, AdaLoRAConfig(total_step=100, init_r=INIT_R, target_r=TARGET_R, lora_alpha=2 * INIT_R,
                                       targets="all-linear"))
    name, layer = next(iter(svd_layers(model).items()))
    print(f"{name}: {layer}")
    print(f"  Q = lora_A {list(layer.lora_A.shape)}, Λ = lora_E {list(layer.lora_E.shape)} (zeros), "
          f"P = lora_B {list(layer.lora_B.shape)}; W0 frozen")
    with torch.no_grad():
        after = model(ids)
    print(f"  Λ = 0, so training starts at the base model: max |logit difference| = {(after - before).abs().max().item():.1e}")
    print(f"  pruning triplet i = setting Λ_i to 0: rank r_l of layer l = number of non-zero Λ_i")


def how_many_parameters(model) -> None:
    """Section 2: AdaLoRA at init_r, what pruning to target_r keeps, and LoRA r=16, tiny and 7B."""
    S.section("2. how many parameters (参数量)")
    tiny_cfg = model.config
    counted = count_parameters(model)[0]
    assert counted == adalora_parameters(tiny_cfg, INIT_R), (counted, adalora_parameters(tiny_cfg, INIT_R))
    print(f"{'method (every linear layer)':36}{'tiny model':>12}{'% of model':>11}{'LLaMA-7B':>16}{'% of model':>11}")
    for label, tiny, big in (
            (f"AdaLoRA at init_r={INIT_R} (counted: {counted:,})", adalora_parameters(tiny_cfg, INIT_R),
             adalora_parameters(LLAMA_7B, INIT_R)),
            (f"  kept after pruning to target_r={TARGET_R} on average", adalora_parameters(tiny_cfg, TARGET_R),
             adalora_parameters(LLAMA_7B, TARGET_R)),
            ("LoRA r=16 (lesson 06)", lora_parameters(tiny_cfg, 16), lora_parameters(LLAMA_7B, 16))):
        print(f"{label:48}{tiny:>12,}{100 * tiny / formula_total(tiny_cfg):>10.2f}%"
              f"{big:>16,}{100 * big / formula_total(LLAMA_7B):>10.3f}%")
    print("(AdaLoRA trains init_r ranks all along: pruning masks Λ, it does not shrink the tensors; the saved "
          "adapter keeps only the surviving triplets, so its size depends on where the rank went)")


def budget_schedule(args, model, tok):
    """Section 3: this run's budget b(t), planned before training from the number of steps the trainer will
    take. Returns (data, held-out rows, the plan, tinit, tfinal, the steps to print)."""
    S.section("3. the budget schedule, planned before training")
    data, rows = S.tiny_world(args, tok)
    print(f"SFT data: {data.report.summary()}; {len(rows)} held-out questions")
    probe = S.config(args, "adalora", args.lr, "unused")
    total = planned_steps(len(data.train), probe)
    tinit, tfinal = (1, 1) if args.fast else (max(1, total // 10), max(1, total // 5))
    plan = AdaLoRAController(model, AdaLoRAConfig(total_step=total, init_r=INIT_R, target_r=TARGET_R, tinit=tinit,
                                                  tfinal=tfinal, targets="all-linear"))
    n_layers = len(svd_layers(model))
    print(f"{n_layers} adapted layers; budget b(t) = total rank: {plan.init_bgt} (= {INIT_R} x {n_layers}) during the "
          f"first tinit={tinit} steps,\nthen b_T + (b_0 - b_T) (1 - (t - tinit) / (T - tinit - tfinal))^3 down to "
          f"{plan.target_bgt} (= {TARGET_R} x {n_layers}) at step T - tfinal = {total - tfinal}, fixed for the last "
          f"tfinal={tfinal} steps")
    marks = sorted({1, tinit, tinit + 1, *range(0, total + 1, max(1, total // 10)), total - tfinal, total} - {0})
    for t in marks:
        b = plan.budget_schedule(t)[0]
        print(f"  step {t:>4}: budget {b:>4}  {'#' * round(40 * b / plan.init_bgt)}")
    return data, rows, plan, tinit, tfinal, marks


def adalora_vs_full(args, tok, data, rows, plan, tinit: int, tfinal: int, marks) -> dict:
    """Section 4: lesson 05's run with AdaLoRA, the budget as the allocator kept it at every step, and the
    table beside full fine-tuning. Returns the AdaLoRA run (its model is section 5's)."""
    S.section("4. AdaLoRA fine-tuning vs full fine-tuning (lesson 05's run)")
    full = S.full_baseline(args, data, rows, tok)
    model, _ = S.load_lesson_model(args)
    cfg = S.config(args, "adalora", args.lr, str(S.ROOT / "runs" / "lesson-07"), adalora_init_r=INIT_R,
                   adalora_target_r=TARGET_R, adalora_tinit=tinit, adalora_tfinal=tfinal, lora_target="all")
    print(f"minitune train --finetuning_type adalora --adalora_init_r {INIT_R} --adalora_target_r {TARGET_R} "
          f"--adalora_tinit {tinit} --adalora_tfinal {tfinal} --lora_target all --learning_rate {args.lr:g} "
          f"--num_train_epochs {args.epochs:g} ...")
    kept, nonzero = {}, {}

    def record(m, step):  # after the trainer's AdaLoRA hook (update_and_allocate) at every step
        pattern = m.adalora_config.rank_pattern  # the allocator's mask: None until it first prunes
        kept[step] = sum(sum(v) for v in pattern.values()) if pattern else plan.init_bgt
        nonzero[step] = sum(int((layer.lora_E != 0).sum()) for layer in svd_layers(m).values())

    ada = S.sft(model, tok, data, rows, cfg, after_step=record)
    print("\nthe budget as it happened (triplets the allocator keeps after each step; non-zero Λ_i, which stay 0 "
          "while the warm-up learning rate is 0) vs the plan:")
    for t in marks:
        print(f"  step {t:>4}: kept {kept[t]:>4} (non-zero Λ {nonzero[t]:>4}), planned {plan.budget_schedule(t)[0]:>4}")
    off_plan = [t for t in marks if kept[t] != plan.budget_schedule(t)[0]]
    claim("the allocator keeps exactly the planned budget at every step shown", not off_plan,
          f"{len(marks) - len(off_plan)} of {len(marks)} steps on plan")
    reg = [m["orth_reg"] for m in ada["metrics"].values() if "orth_reg" in m]
    if reg:
        print(f"orthogonality regulariser (in the logged loss, not in the table's loss): {reg[0]:.3f} -> {reg[-1]:.3f} "
              "(P and Q drift towards orthonormal)")
    print()
    S.print_runs({"full FT": full, f"AdaLoRA {INIT_R}->{TARGET_R}": ada})
    print()
    S.verdict("AdaLoRA", ada, full)
    share = ada["trainable"] / ada["base_params"]
    claim("AdaLoRA 16 -> 8 trains under 15% of the model's parameters", share < 0.15, f"{share:.2%}")
    text = "AdaLoRA reaches full fine-tuning's held-out exact match (at most 5 points below it, or above)"
    if args.fast or full is None:
        not_checked([text])
    else:
        a, b = ada["eval"]["overall"], full["eval"]["overall"]
        claim(text, a >= b - 0.05, f"AdaLoRA {a:.1%} vs full fine-tuning {b:.1%}")
    return ada


def where_the_rank_went(args, tok, model) -> None:
    """Section 5: the final rank of every adapted layer, and the adapter saved in PEFT's layout, read back."""
    S.section("5. where the rank went: final rank of every adapted layer (秩分配)")
    final = ranks(model.adalora_config.rank_pattern)
    print(f"{'layer':8}" + "".join(f"{m:>11}" for m in MODULES) + f"{'sum':>7}")
    for i in range(model.config.num_hidden_layers):
        row = [final[n] for m in MODULES for n in final if n.endswith(f"layers.{i}.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}")]
        print(f"{i:<8}" + "".join(f"{r:>11}" for r in row) + f"{sum(row):>7}")
    per_module = {m: sum(r for n, r in final.items() if n.endswith("." + m)) for m in MODULES}
    print(f"{'sum':8}" + "".join(f"{per_module[m]:>11}" for m in MODULES) + f"{sum(final.values()):>7}")
    print(f"total rank kept {sum(final.values())} of {INIT_R * len(final)} (target {TARGET_R * len(final)}); "
          f"LoRA would give every layer the same rank")
    shapes = layer_linears(model.config)
    kept_params = sum(r * (sum(shapes[n.rsplit('.', 1)[-1]]) + 1) for n, r in final.items())
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_adapter(model, Path(tmp) / "adapter", args.model)
        config = json.loads((folder / "adapter_config.json").read_text())
        size = (folder / "adapter_model.safetensors").stat().st_size
        fresh, _ = S.load_lesson_model(args)
        test = torch.tensor([tok.encode("Reverse the words: red blue green")], device=args.device)
        with torch.no_grad():
            diff = (load_adapter(fresh, folder).eval()(test) - model.eval()(test)).abs().max().item()
    print(f"saved in PEFT's AdaLoRA layout: peft_type={config['peft_type']}, rank_pattern for {len(config['rank_pattern'])} "
          f"layers, {kept_params:,} numbers kept ({size / 1e3:.0f} kB); read back: max |logit difference| {diff:.1e}")
    claim("the adapter saved in PEFT's AdaLoRA layout, read back, gives the same logits", diff < 1e-4, f"{diff:.1e}")
    text = "after the schedule the total rank kept is the target, 8 per layer on average"
    if args.fast:
        not_checked([text])
    else:
        kept, target = sum(final.values()), TARGET_R * len(final)
        claim(text, kept == target, f"{kept} of target {target}")


def main():
    args = S.parse_args("Lesson 07: AdaLoRA", lr=1e-2, epochs=S.PEFT_EPOCHS)
    model, tok = S.load_lesson_model(args)
    svd_form(args, model, tok)
    how_many_parameters(model)
    data, rows, plan, tinit, tfinal, marks = budget_schedule(args, model, tok)
    ada = adalora_vs_full(args, tok, data, rows, plan, tinit, tfinal, marks)
    where_the_rank_went(args, tok, ada["model"])
    S.finish("07")
    finish_claims(args.fast, args.model)


if __name__ == "__main__":
    main()
