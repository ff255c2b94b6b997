"""Lesson 09: QLoRA (量化低秩适配) by hand: NF4, block size, double quantization, memory, the Triton kernel,
and LoRA trained on a 4-bit tiny model.

    python lessons/09-qlora/run.py                 # weights/tiny on CPU, ~3 minutes on 2 cores
    python lessons/09-qlora/run.py --fast          # CI: a few training steps, a few questions (< 60 s)
    python lessons/09-qlora/run.py --seed 1        # another training seed for both runs (default 0)
    python lessons/09-qlora/run.py --model weights/Qwen2.5-0.5B-Instruct --template qwen --device cuda --dtype bfloat16

1. NF4's 16 levels computed from quantiles of N(0, 1), compared with NF4_CODE; NF4 vs uniform int4;
2. block size vs quantization error (measured) and vs bits per parameter;
3. double quantization: bits per parameter of a 4096 x 4096 layer, from nbytes;
4. memory for 0.5B / 7B / 65B models in fp32 / bf16 / int8 / NF4 / NF4+DQ, and QLoRA training totals;
5. the Triton dequant kernel run in Triton's interpreter (TRITON_INTERPRET=1), same bits as the reference;
6. LoRA on the 16-bit tiny model (lesson 06's run) vs QLoRA on its 4-bit copy: same data, settings and seed;
   exact match;
7. merge and dequantize: a plain checkpoint with the same logits.
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import minitune
from minitune.classroom.claims import claim, finish_claims, not_checked
from minitune.classroom.lesson import finish, section
from minitune.classroom.tiny_sft import LESSON_05, LORA  # lesson 05's SFT settings, lesson 06's LoRA: the run repeated here
from minitune.data import PaddingCollator, prepare_sft
from minitune.memory import estimate_memory, human_bytes, layer_linears, parameter_counts
from minitune.model import ModelConfig
from minitune.peft import apply_lora, count_parameters
from minitune.peft.qlora import merge_and_dequantize
from minitune.quant import NF4_CODE, Linear4bit, bits_per_param, dequantize_nf4, nbytes, quantize_nf4
from minitune.quant.nf4 import SUPPORTED_BLOCKSIZES
from minitune.tiny.evaluate import evaluate_tasks
from minitune.train import TrainConfig, causal_lm_loss, train


# Model shapes for the memory table (from their config.json files; LLaMA-1 for 7B / 65B, as in the QLoRA paper).
MODELS = {
    "Qwen2.5-0.5B": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, model_type="qwen2",
                                tie_word_embeddings=True),
    "LLaMA-7B": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, model_type="llama"),
    "LLaMA-65B": ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                             num_attention_heads=64, num_key_value_heads=64, model_type="llama"),
}


def parse_args():
    p = argparse.ArgumentParser(description="Lesson 09: QLoRA, NF4 and double quantization")
    p.add_argument("--model", default="weights/tiny", help="checkpoint folder (default weights/tiny)")
    p.add_argument("--data", default=None, help="folder with sft_alpaca.jsonl and eval.jsonl (default: <model>/data)")
    p.add_argument("--template", default="chatml", help="chat template (chatml for the tiny model, qwen for Qwen)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: bf16 autocast for training (the 4-bit layers compute in what autocast gives)")
    p.add_argument("--fast", action="store_true", help="CI mode: a few steps and a few questions (< 60 s)")
    p.add_argument("--epochs", type=float, default=LORA["epochs"], help=f"default {LORA['epochs']:g}, lesson 06's")
    p.add_argument("--lr", type=float, default=LORA["lr"],
                   help=f"LoRA learning rate (default {LORA['lr']:g}, lesson 06's, for the tiny model; ~2e-4 for 0.5B+)")
    p.add_argument("--rank", type=int, default=LORA["rank"],
                   help=f"LoRA rank r (alpha = 2 r), on every linear layer (default {LORA['rank']}, lesson 06's)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for training (default: 1 for models under 50M parameters, as lesson 05)")
    p.add_argument("--seed", type=int, default=LESSON_05["seed"],
                   help="training seed of both runs: LoRA's A and the order of examples (default 0, lesson 06's; "
                        "the train/held-out split stays lesson 05's). Another seed measures how far a score spreads")
    p.add_argument("--out", default="runs/lesson-09", help="where the training logs go")
    return p.parse_args()


def rel_rmse(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||w - w_hat|| / ||w||: the relative error of a whole tensor."""
    return ((w.float() - w_hat.float()).norm() / w.float().norm()).item()


# --- 1. the code book ------------------------------------------------------------------------------
def nf4_from_quantiles() -> torch.Tensor:
    """QLoRA's construction (bitsandbytes' create_normal_map): quantiles of N(0, 1) at evenly spaced
    probabilities, 8 for the positive half and 7 for the negative, plus an exact 0, scaled to [-1, 1].

    The probabilities stop at offset = 0.9677 instead of 1 (Phi^-1(1) is infinite): the mean of
    1 - 1/(2*15) and 1 - 1/(2*16), the centres of the last bins of 15- and 16-bin splits."""
    offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    ppf = lambda p: torch.special.ndtri(p.double())  # noqa: E731  Phi^-1, the normal quantile function
    positive = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    negative = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    v = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (v / v.max()).float(), offset


def int4_absmax(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """The uniform alternative: 15 evenly spaced levels in [-1, 1] per absmax block (symmetric int4)."""
    x = w.reshape(-1, blocksize).float()
    c = x.abs().amax(1, keepdim=True)
    return (torch.round(x / c * 7) / 7 * c).view_as(w)


def code_usage_entropy(idx: torch.Tensor, n_levels: int) -> float:
    """Entropy in bits of how often each level is used (4.0 = every level equally often)."""
    p = torch.bincount(idx.flatten(), minlength=n_levels).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def why_nf4(fast: bool):
    """Section 1: the code book rebuilt from normal quantiles, and NF4 against uniform int4 on normal weights."""
    section("1. why NF4: 16 levels at quantiles of a normal distribution (4 位正态浮点, NormalFloat)")
    mine, offset = nf4_from_quantiles()
    diff = (mine - NF4_CODE).abs().max().item()
    print(f"offset = (1 - 1/30 + 1 - 1/32) / 2 = {offset:.7f}   (bitsandbytes hard-codes 0.9677083)")
    print(f"{'i':>3} {'from Phi^-1':>13} {'NF4_CODE':>13}")
    for i, (a, b) in enumerate(zip(mine.tolist(), NF4_CODE.tolist())):
        print(f"{i:>3} {a:>13.7f} {b:>13.7f}")
    print(f"max |difference| = {diff:.2e}  -> the table is the normal quantiles, nothing more")
    claim("NF4's 16 levels are the quantiles of a normal distribution, scaled to [-1, 1]", diff < 1e-6,
          f"max |difference| {diff:.1e}")

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256 if fast else 1024, 1024, generator=g) * 0.02  # a layer's worth of N(0, sigma^2) weights
    q = quantize_nf4(w, blocksize=64)
    idx = torch.stack([q.packed >> 4, q.packed & 15], 1).flatten().long()
    w_int4 = int4_absmax(w)
    idx_int4 = torch.round(w.reshape(-1, 64) / w.reshape(-1, 64).abs().amax(1, keepdim=True) * 7).long() + 7
    print(f"\nN(0, 0.02^2) weights, {w.numel():,} of them, block 64, 4 bits each:")
    print(f"  {'code':<22}{'rel. error':>11}{'level-usage entropy':>22}")
    print(f"  {'NF4 (normal quantiles)':<22}{rel_rmse(w, dequantize_nf4(q)):>11.4f}"
          f"{code_usage_entropy(idx, 16):>17.3f} bits")
    print(f"  {'int4 (uniform, 15 lv)':<22}{rel_rmse(w, w_int4):>11.4f}{code_usage_entropy(idx_int4, 15):>17.3f} bits")
    print("  equal-probability levels use the 4 bits better: more of them sit where the weights are.")
    err_nf4, err_int4 = rel_rmse(w, dequantize_nf4(q)), rel_rmse(w, w_int4)
    claim("on normally distributed weights NF4's error is below uniform int4's", err_nf4 < err_int4,
          f"relative error {err_nf4:.4f} vs {err_int4:.4f}")


# --- 2. block size -------------------------------------------------------------------------------
def block_size_vs_error(model_path: Path, fast: bool):
    """Section 2: the error of each block size on normal, heavy-tailed and (if there) the tiny model's weights."""
    section("2. block size vs error: one absmax scale per block of B weights (分块量化)")
    g = torch.Generator().manual_seed(1)
    gauss = torch.randn(512 if fast else 2048, 1024, generator=g)
    # Real weights have outliers; a heavy-tailed Student-t stand-in shows why small blocks matter.
    heavy = torch.distributions.StudentT(3.0).sample((gauss.shape[0], 1024))
    real = None
    if (model_path / "config.json").exists():
        m, _ = minitune.load_pretrained(model_path, dtype=torch.float32)
        real = torch.cat([p.detach().flatten() for n, p in m.named_parameters()
                          if p.dim() == 2 and "embed" not in n and "lm_head" not in n])
        real = real[: real.numel() // 4096 * 4096]
    header = f"  {'block B':>7} {'bits/param':>11} {'N(0,1)':>9} {'Student-t3':>11}"
    print(header + (f" {'tiny model linears':>19}" if real is not None else ""))
    for bs in SUPPORTED_BLOCKSIZES:
        q = quantize_nf4(gauss, blocksize=bs)
        row = (f"  {bs:>7} {bits_per_param(q):>11.3f} {rel_rmse(gauss, dequantize_nf4(q)):>9.4f} "
               f"{rel_rmse(heavy, dequantize_nf4(quantize_nf4(heavy, blocksize=bs))):>11.4f}")
        if real is not None:
            row += f" {rel_rmse(real, dequantize_nf4(quantize_nf4(real, blocksize=bs))):>19.4f}"
        print(row)
    print("  (relative error = ||W - W_hat|| / ||W||; bits/param = 4 + 32/B without double quantization)")


# --- 3. double quantization ------------------------------------------------------------------------
def double_quantization(fast: bool):
    """Section 3: bits per parameter from nbytes, with float32 scales and with 8-bit ones, part by part."""
    section("3. double quantization (双重量化): quantize the scales too")
    rows = 1024 if fast else 4096  # --fast: a quarter of the layer (same bits per parameter to 4 digits)
    w = torch.randn(rows, 4096, generator=torch.Generator().manual_seed(2)) * 0.02
    print(f"a {rows} x 4096 layer: {w.numel():,} weights, {human_bytes(w.numel() * 2)} in bf16")
    print(f"  {'storage':<34}{'bytes (nbytes)':>16}{'bits/param':>12}{'rel. error':>12}")
    for dq in (False, True):
        t0 = time.perf_counter()
        q = quantize_nf4(w, blocksize=64, double_quant=dq)
        name = "NF4 + double quant (8-bit scales)" if dq else "NF4, float32 scale per 64"
        print(f"  {name:<34}{nbytes(q):>16,}{bits_per_param(q):>12.4f}{rel_rmse(w, dequantize_nf4(q)):>12.5f}"
              f"   ({time.perf_counter() - t0:.1f} s to quantize)")
        if dq:
            parts = {"packed codes (4 bit)": q.packed, "8-bit scales": q.absmax, "offset": q.offset,
                     "second-level fp32 scales": q.absmax2, "8-bit code map": q.code2}
            for k, t in parts.items():
                print(f"      {k:<28}{t.numel() * t.element_size():>12,} bytes  "
                      f"= {8 * t.numel() * t.element_size() / w.numel():.4f} bits/param")
    print("  formula: 4 + 8/64 + 32/(64*256) = 4.127 bits; the scales cost 0.127 instead of 0.5 bits")


# --- 4. memory --------------------------------------------------------------------------------------
def linear_bytes(cfg: ModelConfig, fmt: str) -> float:
    """Bytes of the block Linear weights in `fmt`, counted layer by layer as nbytes() counts them."""
    total = 0.0
    for _, (i, o) in layer_linears(cfg).items():
        n = i * o
        if fmt == "fp32":
            b = 4 * n
        elif fmt == "bf16":
            b = 2 * n
        elif fmt == "int8":  # LLM.int8()-style: int8 weights, one float32 scale per output row
            b = n + 4 * o
        else:
            blocks = -(-n // 64)
            b = -(-n // 2) + 4 * blocks  # packed codes + float32 absmax
            if fmt == "nf4+dq":  # uint8 scales, offset, float32 per 256 scales, the 256-entry map
                b = -(-n // 2) + blocks + 4 + 4 * -(-blocks // 256) + 4 * 256
        total += b
    return total * cfg.num_hidden_layers


def memory():
    """Section 4: weight bytes per format for three model sizes, and the training totals of full, LoRA, QLoRA."""
    section("4. memory: weights of 0.5B / 7B / 65B models, and what QLoRA training needs")
    # the per-layer formula against nbytes() of a real quantized tensor
    small = ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    for fmt, dq in (("nf4", False), ("nf4+dq", True)):
        measured = sum(nbytes(quantize_nf4(torch.randn(o, i), 64, dq)) for i, o in layer_linears(small).values())
        assert linear_bytes(small, fmt) == measured, (fmt, linear_bytes(small, fmt), measured)
    print("(the byte formula equals nbytes() of real quantized layers; embeddings, norms and the head stay bf16"
          " in the int8 / NF4 columns, as in bitsandbytes)")
    fmts = ["fp32", "bf16", "int8", "nf4", "nf4+dq"]
    print(f"  {'model':<14}{'params':>8}" + "".join(f"{f:>10}" for f in fmts))
    for name, cfg in MODELS.items():
        counts = parameter_counts(cfg)
        n = sum(counts.values())
        row = f"  {name:<14}{n / 1e9:>7.2f}B"
        for f in fmts:
            other = counts["other"] * (4 if f == "fp32" else 2)
            row += f"{human_bytes(linear_bytes(cfg, f) + other):>10}"
        print(row)
    print("\n  training memory (minitune.memory.estimate_memory: batch 1 x 512 tokens, LoRA r=64 on every linear,"
          " AdamW, bf16):")
    print(f"  {'model':<14}{'full (mixed bf16)':>19}{'LoRA, bf16 base':>17}{'QLoRA, NF4+DQ base':>20}")
    for name, cfg in MODELS.items():
        est = {m: estimate_memory(cfg, method=m, dtype=torch.bfloat16, batch_size=1, seq_len=512, lora_r=64)
               for m in ("full", "lora", "qlora")}
        print(f"  {name:<14}{human_bytes(est['full'].total):>19}{human_bytes(est['lora'].total):>17}"
              f"{human_bytes(est['qlora'].total):>20}")
    print("  (estimates; activations, allocator slack and the CUDA context come on top or vary)")


# --- 5. the Triton kernel ---------------------------------------------------------------------------
TRITON_CHECK = r"""
import json, time, torch
from minitune.quant import dequantize_nf4, quantize_nf4
from minitune.quant.nf4_triton import dequantize_nf4_triton
w = torch.randn(33, 65, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)  # 2145 weights: odd, 34 blocks
for dq in (False, True):
    q = quantize_nf4(w, blocksize=64, double_quant=dq)
    for out in (torch.float32, torch.bfloat16, torch.float16):
        t0 = time.perf_counter()
        got = dequantize_nf4_triton(q, out)
        dt = time.perf_counter() - t0
        ref = dequantize_nf4(q, out)
        print(json.dumps(dict(dq=dq, out=str(out), same=bool(torch.equal(got, ref)), s=round(dt, 2))))
"""


def triton_kernel():
    """Section 5: the Triton kernel, interpreted on CPU, bit for bit against the PyTorch reference."""
    section("5. the Triton kernel (minitune/quant/nf4_triton.py), run by Triton's interpreter on CPU")
    try:
        import importlib.util
        if importlib.util.find_spec("triton") is None:
            print("triton is not installed: skipped (pip install triton; the PyTorch reference is used meanwhile)")
            return
    except Exception as e:  # noqa: BLE001
        print(f"triton not importable ({e}): skipped")
        return
    # TRITON_INTERPRET must be set before triton is imported, so the kernel runs in a fresh process
    env = dict(os.environ, TRITON_INTERPRET="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        print(f"the interpreted kernel failed:\n{proc.stderr[-2000:]}")
        return
    print("a 33 x 65 bf16 tensor (2145 weights: an odd count, a partial last block), kernel vs PyTorch reference:")
    for line in proc.stdout.splitlines():
        r = json.loads(line)
        print(f"  {'double quant' if r['dq'] else 'plain NF4   '}  out {r['out']:<15} bit-identical: {r['same']}"
              f"   ({r['s']} s interpreted)")
    print(f"subprocess with TRITON_INTERPRET=1: {time.perf_counter() - t0:.1f} s. On a GPU the same kernel is compiled;"
          " bench/bench_nf4.py measures its GB/s")


# --- 6. QLoRA on the tiny world ---------------------------------------------------------------------
def finetune(model, tok, data, args, label: str):
    quantized = any(isinstance(m, Linear4bit) for m in model.modules())
    # lesson 05's split, batch 8, cosine schedule and warmup, as lesson 06 trains LoRA (tiny_sft.py); --seed
    cfg = TrainConfig(**{**LESSON_05, "template": args.template, "seed": args.seed},
                      finetuning_type="qlora" if quantized else "lora",
                      learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=3 if args.fast else None,
                      logging_steps=2 if args.fast else 10, save_steps=0, output_dir=f"{args.out}/{label}",
                      overwrite_output_dir=True,  # a rerun of the lesson replaces its last run
                      bf16=args.dtype == "bfloat16", device=args.device)
    torch.manual_seed(cfg.seed)  # as tiny_sft.sft: the same A for LoRA and QLoRA, and lesson 06's
    apply_lora(model, r=args.rank, alpha=2 * args.rank, targets="all-linear")
    trainable, total = count_parameters(model)
    n4 = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    result = train(model, data.train, cfg, val_data=data.val, collate=PaddingCollator(tok), tokenizer=tok)
    losses = list(result.losses.values())
    print(f"  {label}: {trainable:,} trainable of {total + n4:,} parameters"
          + (f" ({n4:,} of them in 4-bit buffers)" if n4 else "") + f"; {result.global_step} steps in "
          f"{result.runtime_s:.0f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"eval loss {list(result.eval_losses.values())[-1]:.3f}")
    return result


def weight_bytes(model) -> int:
    """Bytes of the block linear weights as stored (4-bit buffers, or float weights)."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            total += m.weight_nbytes()
        elif isinstance(m, torch.nn.Linear) and name != "lm_head" and "lora_" not in name:
            total += m.weight.numel() * m.weight.element_size()
    return total


def qlora_vs_lora(args):
    """Section 6: lesson 06's LoRA run on the fp32 tiny model and on its NF4 copy, same settings and seed.
    Returns (QLoRA model, tokenizer, held-out rows, its evaluation) for section 7, or None without the model."""
    section("6. QLoRA on the tiny world: LoRA on a 16-bit base vs LoRA on its 4-bit NF4 copy")
    path = Path(args.model)
    data_dir = Path(args.data) if args.data else path / "data"
    if not (path / "config.json").exists() or not (data_dir / "sft_alpaca.jsonl").exists():
        print(f"{path} (or its data/) is not there yet: skipped. Build the tiny model first (lesson 04).")
        return None
    lora_model, tok = minitune.load_pretrained(path, device=args.device, dtype=torch.float32)
    if args.device == "cpu" and (args.threads or lora_model.num_parameters() < 50e6):
        torch.set_num_threads(args.threads or 1)  # small matrices gain nothing from a second thread
    qlora_model, _ = minitune.load_pretrained(path, device=args.device, dtype=torch.float32, quantize="nf4")
    print(f"linear weights: {human_bytes(weight_bytes(lora_model))} in fp32 -> {human_bytes(weight_bytes(qlora_model))}"
          f" in NF4+DQ; 4-bit layers: {sum(isinstance(m, Linear4bit) for m in qlora_model.modules())}")
    data = prepare_sft(data_dir / "sft_alpaca.jsonl", tok, args.template, cutoff_len=LESSON_05["cutoff_len"],
                       val_size=LESSON_05["val_size"], seed=LESSON_05["seed"])
    rows = [json.loads(x) for x in (data_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    if args.fast:  # a few questions of each kind
        rows = rows[::len(rows) // 8][:8]
    print(f"SFT data: {data.report.summary()}; {len(rows)} held-out questions; LoRA r={args.rank}, "
          f"alpha={2 * args.rank}, every linear layer, lr {args.lr}, {args.epochs:g} epochs")

    # what 4 bits cost the base model before any training: its loss on the held-out SFT examples
    collate, val = PaddingCollator(tok), data.val
    with torch.no_grad():
        losses = [causal_lm_loss(m, {k: v.to(args.device) for k, v in collate(val).items()})[0].item()
                  for m in (lora_model, qlora_model)]
    print(f"held-out SFT loss of the base model: {losses[0]:.4f} (fp32) vs {losses[1]:.4f} (NF4 + DQ)")
    claim("4 bits barely change the base model: its held-out SFT loss in NF4 is within 1% of fp32's",
          abs(losses[1] - losses[0]) < 0.01 * losses[0], f"{losses[0]:.4f} (fp32) vs {losses[1]:.4f} (NF4 + DQ)")
    base = evaluate_tasks(lora_model, tok, rows, args.template)
    finetune(lora_model, tok, data, args, "lora")
    finetune(qlora_model, tok, data, args, "qlora")
    after = {"LoRA (16-bit base)": evaluate_tasks(lora_model, tok, rows, args.template),
             "QLoRA (NF4 base)": evaluate_tasks(qlora_model, tok, rows, args.template)}
    tasks = [t for t in ("arithmetic", "reversal", "capital", "colour", "sound", "identity") if t in base["n"]]
    print(f"\n  {'exact match (完全匹配)':<22}{'n':>5}{'base model':>12}" + "".join(f"{k:>20}" for k in after))
    for t in tasks:
        print(f"  {t:<22}{base['n'][t]:>5}{base['accuracy'][t]:>12.0%}"
              + "".join(f"{r['accuracy'][t]:>20.0%}" for r in after.values()))
    print(f"  {'all':<22}{len(rows):>5}{base['overall']:>12.0%}" + "".join(f"{r['overall']:>20.0%}" for r in after.values()))
    lo, qlo = (r["overall"] for r in after.values())
    print(f"  QLoRA - LoRA = {100 * (qlo - lo):+.1f} points (LoRA with these defaults is lessons/06-lora/run.py's run)")
    texts = ["QLoRA on the 4-bit base lands at most 15 points below LoRA on the 16-bit base",
             "QLoRA still gets at least 45% of the held-out questions (lesson 05's full fine-tuning: about 50%)"]
    if args.fast:
        not_checked(texts)
    else:
        claim(texts[0], qlo >= lo - 0.15, f"QLoRA {qlo:.1%} vs LoRA {lo:.1%}: {100 * (qlo - lo):+.1f} points")
        claim(texts[1], qlo >= 0.45, f"{qlo:.1%}")
    return qlora_model, tok, rows, after["QLoRA (NF4 base)"]


def merge_back_to_16_bits(qlora_model, tok, rows, acc, args):
    """Section 7: merge the adapter into dequantized weights; the bf16 checkpoint reloads with the same logits."""
    section("7. merge and dequantize: W = dequant(W_nf4) + (alpha/r) B A, saved as a plain bf16 checkpoint")
    ids = torch.tensor([tok.encode("Who are you?")], device=args.device)
    with torch.no_grad():
        before = qlora_model(ids).float()
        merged32 = merge_and_dequantize(copy.deepcopy(qlora_model), torch.float32)
        err32 = ((merged32(ids).float() - before).abs().max() / before.abs().max()).item()
        merged = merge_and_dequantize(qlora_model, torch.bfloat16)
        with tempfile.TemporaryDirectory() as tmp:
            minitune.save_pretrained(merged, tok, Path(tmp) / "merged")
            size = sum(f.stat().st_size for f in (Path(tmp) / "merged").glob("*.safetensors"))
            again, _ = minitune.load_pretrained(Path(tmp) / "merged", device=args.device)
        same = torch.equal(again(ids), merged(ids))
        err16 = ((again(ids).float() - before).abs().max() / before.abs().max()).item()
    print(f"merged in fp32: max |logit difference| / max |logit| = {err32:.1e} (the same function, one matmul)")
    print(f"bf16 checkpoint: {human_bytes(size)} of safetensors, dtype {next(again.parameters()).dtype}; "
          f"reloaded logits identical to the merged model's: {same}")
    print(f"bf16 checkpoint vs the QLoRA model: max |logit difference| / max |logit| = {err16:.1e} (bf16 rounding)")
    claim("the adapter merged into the dequantized weights gives the QLoRA model's logits (fp32, relative 1e-4), "
          "and the bf16 checkpoint reloads with identical logits", err32 < 1e-4 and same,
          f"relative {err32:.1e}; reloaded identical: {same}")


def main():
    args = parse_args()
    torch.manual_seed(0)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    why_nf4(args.fast)
    block_size_vs_error(Path(args.model), args.fast)
    double_quantization(args.fast)
    memory()
    triton_kernel()
    out = qlora_vs_lora(args)
    if out is not None:
        merge_back_to_16_bits(*out, args)
    finish("09")
    finish_claims(args.fast, args.model)


if __name__ == "__main__":
    main()
