"""One LoRA training step on CPU: minitune vs transformers + PEFT, same checkpoint, same adapter.

A ~6M-parameter Qwen2-shaped model (vocab 6000, hidden 256, 6 layers, 4 query / 2 key-value heads,
intermediate 688, tied embeddings) is written by transformers into a temporary folder and loaded by
both sides. LoRA r=16 (alpha 32, dropout 0) on every linear layer but the head; minitune's adapter is
saved and loaded into PEFT, so both start from identical weights (the first losses are checked to
agree). A step is forward + next-token cross-entropy + backward + AdamW step + zero_grad on a batch of
8 x 256 tokens (minitune: the trainer's causal_lm_loss, with the head fused into the loss as
minitune/train/loss.py does it; PEFT: the model's own loss from labels).
After warm-up, the two sides alternate for --rounds rounds (so drifting machine load hits both
alike); medians of tokens/s are reported, and of the process CPU time per step, which other work on a
shared machine disturbs less than wall time (with one thread it is the better figure to compare).

With --breakdown, one more step of each side runs under torch.profiler and its CPU time is split into
matrix products (the base layers' GEMMs, the head, LoRA's thin products), attention (SDPA) and the
rest (element-wise ops, softmax, optimizer): where the two differ and where they do the same work.

On a GPU (`--device cuda --dtype bfloat16`, weights and adapter in bf16 on both sides) the same
comparison runs on a larger shape, `--shape qwen2.5-0.5b` (Qwen2.5-0.5B's config with random weights);
times are taken after torch.cuda.synchronize().

Run:  python bench/bench_lora.py [--rounds 7] [--threads N] [--breakdown]
      python bench/bench_lora.py --device cuda --dtype bfloat16 --shape qwen2.5-0.5b
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import minitune
from minitune.peft import apply_lora, count_parameters, save_adapter
from minitune.train.trainer import causal_lm_loss

SHAPES = {
    "6m": dict(vocab_size=6000, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=688, tie_word_embeddings=True, max_position_embeddings=2048),
    # Qwen/Qwen2.5-0.5B-Instruct's config.json (the fields that shape the model)
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--breakdown", action="store_true", help="profile one more step of each: where the time goes")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shape", default="6m", choices=sorted(SHAPES), help="model shape (default 6m, ~6M parameters)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    SHAPE, dtype, device = SHAPES[args.shape], getattr(torch, args.dtype), torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    import peft  # the references; minitune itself never imports them
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        hf_cfg = transformers.Qwen2Config(**SHAPE, bos_token_id=1, eos_token_id=2)
        transformers.Qwen2ForCausalLM(hf_cfg).save_pretrained(f"{tmp}/ckpt")

        ours, _ = minitune.load_pretrained(f"{tmp}/ckpt", device=device, dtype=dtype)
        apply_lora(ours, r=args.r, alpha=2 * args.r, targets="all-linear")
        save_adapter(ours, f"{tmp}/adapter")
        hf = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/ckpt", dtype=dtype).to(device)
        ref = peft.PeftModel.from_pretrained(hf, f"{tmp}/adapter", is_trainable=True).to(device)
    ours.train()
    ref.train()
    assert count_parameters(ours) == ref.get_nb_trainable_parameters()

    x = torch.randint(3, SHAPE["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    batch = {"input_ids": x, "labels": x}
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-4)

    def step_ours():
        loss, _ = causal_lm_loss(ours, batch)  # the trainer's next-token loss, as a minitune run computes it
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad()
        return loss.item()

    def step_ref():
        loss = ref(input_ids=x, labels=x).loss
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad()
        return loss.item()

    first = step_ours(), step_ref()
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 sums round at 2^-8
    assert abs(first[0] - first[1]) < tol * abs(first[1]), f"first losses differ: {first}"
    for _ in range(args.warmup - 1):
        step_ours(), step_ref()

    contenders = {"minitune": step_ours, "transformers+PEFT": step_ref}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}  # process CPU time: less hurt by a busy machine
    for i in range(args.rounds):
        for name, fn in (contenders.items() if i % 2 == 0 else reversed(contenders.items())):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    tokens = args.batch * args.seq
    trainable, total = count_parameters(ours)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"{args.dtype}, shape {args.shape}")
    print(f"model: {total - trainable:,} base params, LoRA r={args.r} all-linear: {trainable:,} trainable; "
          f"batch {args.batch} x {args.seq} tokens, AdamW; first losses {first[0]:.5f} / {first[1]:.5f}; "
          f"median of {args.rounds} alternating rounds after {args.warmup} warm-up steps")
    tps = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"  {name:18s} {statistics.median(ts) * 1e3:8.1f} ms/step  {tps[name]:9.0f} tokens/s  "
              f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f} ms; CPU {statistics.median(cpu[name]) * 1e3:.1f} ms)")
    ours_tps, peft_tps = tps["minitune"], tps["transformers+PEFT"]
    cpu_ratio = statistics.median(cpu["transformers+PEFT"]) / statistics.median(cpu["minitune"])
    print(f"  ratio: minitune = {ours_tps / peft_tps:.2f}x transformers+PEFT tokens/s (CPU time per step: {cpu_ratio:.2f}x)")
    if args.breakdown:
        print("  where a step's CPU time goes (torch.profiler, self time of the aten ops, median of 3 steps):")
        for name, fn in contenders.items():
            runs = [breakdown(fn) for _ in range(3)]
            parts = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"  {name:18s} " + "   ".join(f"{k} {v:6.0f} ms" for k, v in parts.items()))


GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


def breakdown(step) -> dict[str, float]:
    """One step under the profiler: self CPU ms of matrix products, attention, and everything else."""
    from torch.profiler import profile
    with profile() as prof:
        step()
    parts = {"matrix products": 0.0, "attention": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue  # Python-level ranges (autograd nodes, optimizer) contain aten ops already counted
        kind = "matrix products" if ev.key in GEMMS else "attention" if "scaled_dot_product" in ev.key else "other"
        parts[kind] += ev.self_cpu_time_total / 1e3
    return parts


if __name__ == "__main__":
    main()
