"""QLoRA of a Qwen2.5-7B shape: minitune beside transformers + PEFT + bitsandbytes, step time and peak memory.

    python bench/bench_qlora_gpu.py [--ckpt /tmp/qwen2.5-7b-random] [--batches 1,4] [--seq 1024]
                                    [--warmup 2] [--steps 5] [--grad-ckpt] [--no-hf] [--json qlora.json]
    python bench/bench_qlora_gpu.py --smoke      # CPU, a 2-block tiny shape, seconds (tests/test_bench_gpu_smoke.py)

1. A random checkpoint of the shape is written shard by shard (bench/random_checkpoint.py; ~15 GB of
   bf16 safetensors for 7B, drawn on the GPU) unless --ckpt already holds one.
2. minitune: load_model(ckpt, "cuda", bf16, quantize="nf4") reads one tensor at a time from the files on
   the host and quantizes each linear weight on the GPU as it arrives, so the bf16 model is never held
   there (the load's peak is printed beside the NF4 model's size and the bf16 one). Then LoRA r=16,
   alpha 32, on q k v o gate up down of every block (QLoRALinear: fp32 A and B), AdamW.
3. transformers + PEFT + bitsandbytes on the same files: BitsAndBytesConfig(nf4, double quant, bf16
   compute), get_peft_model with the same LoRA (PEFT also keeps A and B in fp32), the same A matrices
   (copied from minitune's, so the runs are the same maths), AdamW.
4. For each batch size B: steps of [B, seq] random tokens (the same batches for both), each step
   zero_grad, forward, next-token loss, backward, optimizer step, timed with the GPU synchronised;
   tokens/s = B x seq / median of the steps after --warmup. Peak memory is
   torch.cuda.max_memory_allocated over the steps (the resident model included), beside
   minitune.memory.estimate_memory(..., "qlora"). The losses of the first steps of the two are compared
   (relative difference within --loss-rtol: bf16 rounding, different kernels).

The two sides run one after the other (the first is freed before the second loads), so each peak is its
own. --grad-ckpt recomputes each block in backward on both sides (torch.utils.checkpoint around
minitune's blocks, here in the benchmark; transformers' gradient_checkpointing_enable). The machine,
driver and versions are printed and written to --json with every result (rewritten as results come).
Without CUDA it exits with code 2 unless --smoke (bf16 on the CPU; the transformers side too when
bitsandbytes runs on the CPU, as 0.50 does).
"""

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, however this file is run
from bench_decode_gpu import machine_info, sync, write_json  # noqa: E402
from random_checkpoint import write_random_checkpoint  # noqa: E402

from minitune import memory  # noqa: E402
from minitune.model import ModelConfig  # noqa: E402
from minitune.model.checkpoint import load_model  # noqa: E402
from minitune.peft.lora import apply_lora, lora_state_dict  # noqa: E402
from minitune.peft.qlora import QLoRALinear  # noqa: E402,F401  (registers the LoRA layer for a 4-bit base)
from minitune.train.loss import causal_lm_loss  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def memory_now(device) -> dict:
    if device != "cuda":
        return {}
    return dict(allocated=torch.cuda.memory_allocated(), peak=torch.cuda.max_memory_allocated())


def reset_peak(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model_bytes(model) -> int:
    """Bytes of the parameters and buffers (a tied tensor once)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def checkpoint_blocks(model):
    """Gradient checkpointing for minitune's blocks: keep each block's input, recompute its inside in backward."""
    for block in model.model.layers:
        forward = block.forward
        block.forward = (lambda x, inputs, cache=None, layer=0, f=forward:
                         torch.utils.checkpoint.checkpoint(f, x, inputs, cache, layer, use_reentrant=False))


def run_steps(model, loss_fn, params, batches, warmup, lr, device) -> dict:
    """Train on each of `batches` ([B, S] ids) with a fresh AdamW; the losses, step times and peak memory."""
    opt = torch.optim.AdamW(params, lr=lr)
    reset_peak(device)
    before = memory_now(device)
    losses, times = [], []
    for ids in batches:
        ids = ids.to(device)
        sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    out = dict(losses=losses, times_s=times, median_s=statistics.median(times[warmup:]),
               tokens_per_s=batches[0].numel() / statistics.median(times[warmup:]))
    if device == "cuda":
        out.update(resident_before_steps_bytes=before["allocated"], peak_bytes=torch.cuda.max_memory_allocated())
    opt.zero_grad(set_to_none=True)
    del opt
    return out


def minitune_loss(model, ids):
    return causal_lm_loss(model, {"input_ids": ids, "labels": ids})[0]


def hf_loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss  # training: no KV cache to fill


def timed_load(load, device):
    reset_peak(device)
    t = time.perf_counter()
    model = load()
    sync(device)
    seconds = time.perf_counter() - t
    return model, dict(seconds=seconds, **{f"{k}_bytes": v for k, v in memory_now(device).items()})


def run_minitune(args, device, batches_by_size):
    model, load = timed_load(lambda: load_model(args.ckpt, device, torch.bfloat16, quantize="nf4"), device)
    load["model_bytes"] = model_bytes(model)
    apply_lora(model, r=args.r, alpha=2 * args.r, targets=TARGETS)
    if args.grad_ckpt:
        checkpoint_blocks(model)
    model.train()
    init = {k: v.detach().cpu().clone() for k, v in lora_state_dict(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    runs = {}
    for B, batches in batches_by_size.items():
        model.load_state_dict(init, strict=False)  # every batch size starts from the same adapter
        runs[B] = run_steps(model, minitune_loss, params, batches, args.warmup, args.lr, device)
    del model, params
    reset_peak(device)
    return load, runs, init


def run_hf(args, device, batches_by_size, init):
    import peft
    import transformers

    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.bfloat16)
    target = {"": 0} if device == "cuda" else {"": "cpu"}
    model, load = timed_load(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        args.ckpt, quantization_config=quant, dtype=torch.bfloat16, device_map=target), device)
    load["model_bytes"] = model_bytes(model)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                       target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    model.train()
    lora = {n.removeprefix("base_model.model.").replace(".default.", "."): p
            for n, p in model.named_parameters() if "lora_" in n}
    assert set(lora) == set(init), sorted(set(lora) ^ set(init))[:4]
    dtypes = {str(p.dtype) for p in lora.values()}
    params = list(lora.values())
    runs = {}
    for B, batches in batches_by_size.items():
        with torch.no_grad():
            for name, p in lora.items():
                p.copy_(init[name])  # minitune's A (and zero B): the same starting point
        runs[B] = run_steps(model, hf_loss, params, batches, args.warmup, args.lr, device)
    del model, params, lora
    reset_peak(device)
    return dict(load, lora_dtypes=sorted(dtypes)), runs


def bitsandbytes_usable() -> str | None:
    """None if transformers + PEFT + bitsandbytes can run here, else why not."""
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        return f"not installed ({e})"
    return None


def gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def minitune_rows(args, cfg, device, load, runs) -> list[dict]:
    """One row per batch size: minitune's figures beside minitune.memory's estimate (printed as they come)."""
    bf16 = 2 * memory.count_parameters(cfg)
    print(f"\nload (minitune, quantize='nf4'): {load['seconds']:.1f} s, model {gib(load['model_bytes'])} "
          f"(in bf16: {gib(bf16)})" + (f", GPU memory after {gib(load['allocated_bytes'])}, peak while loading "
                                       f"{gib(load['peak_bytes'])}" if device == "cuda" else ""))
    rows = []
    for B, ours in runs.items():
        est = memory.estimate_memory(cfg, "qlora", torch.bfloat16, batch_size=B, seq_len=args.seq, lora_r=args.r,
                                     lora_target=TARGETS)
        rows.append(dict(batch=B, seq=args.seq, minitune=ours, estimate_bytes=est.total, estimate=str(est)))
        print(f"batch {B} x {args.seq}: minitune {ours['tokens_per_s']:.0f} tok/s ({ours['median_s'] * 1000:.0f} ms/step), "
              f"peak {gib(ours.get('peak_bytes'))}; minitune.memory estimate {gib(est.total)}"
              + (" (it does not model gradient checkpointing)" if args.grad_ckpt else ""))
    return rows


def compare(args, device, rows, load, runs):
    """Add transformers + PEFT + bitsandbytes to each row: speed-up, peak ratio, the first losses side by side."""
    # model_bytes leaves out bitsandbytes' scales (kept in a QuantState, not in buffers): the GPU figures count all
    print(f"\nload (transformers + bitsandbytes): {load['seconds']:.1f} s, 4-bit weights and the rest "
          f"{gib(load['model_bytes'])} (scales not counted)" + (f", GPU memory after {gib(load['allocated_bytes'])}, "
                                                                f"peak while loading {gib(load['peak_bytes'])}"
                                                                if device == "cuda" else ""))
    for row in rows:
        ours, theirs = row["minitune"], runs[row["batch"]]
        n = min(args.compare, len(ours["losses"]))
        rel = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"][:n], theirs["losses"][:n]))
        row.update({"transformers+peft+bnb": theirs, "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
                    "loss_max_rel_diff": rel, "losses_match": rel <= args.loss_rtol})
        if device == "cuda":
            row["peak_ratio"] = ours["peak_bytes"] / theirs["peak_bytes"]
        print(f"batch {row['batch']} x {args.seq}: transformers+peft+bnb {theirs['tokens_per_s']:.0f} tok/s "
              f"({theirs['median_s'] * 1000:.0f} ms/step), peak {gib(theirs.get('peak_bytes'))}; minitune "
              f"{row['speedup']:.2f}x their tokens/s" + (f", {row['peak_ratio']:.2f}x their peak" if device == "cuda" else ""))
        print(f"  first {n} losses: minitune {[round(x, 4) for x in ours['losses'][:n]]}, theirs "
              f"{[round(x, 4) for x in theirs['losses'][:n]]}: max relative difference {rel:.1e} "
              f"({'within' if row['losses_match'] else 'OUTSIDE'} {args.loss_rtol})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="/tmp/qwen2.5-7b-random", help="written here first if it holds no checkpoint")
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks than the shape's (a quick look)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up ones")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--compare", type=int, default=3, help="how many first losses to compare")
    ap.add_argument("--loss-rtol", type=float, default=1e-2)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--no-hf", action="store_true", help="minitune only")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, 3 steps: checks the script runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        device = "cpu"
        args.shape, args.layers, args.batches, args.seq, args.warmup, args.steps = "tiny", 2, "2", 16, 1, 2
        if args.ckpt == ap.get_default("ckpt"):
            args.ckpt = tempfile.mkdtemp(prefix="qlora-smoke-")
        torch.set_num_threads(1)  # tiny matrices: threads only add waiting, more so on a shared CPU
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU machine (or with --smoke on the CPU)")
        sys.exit(2)
    else:
        device = "cuda"
    info = machine_info(device)
    skipped = "--no-hf" if args.no_hf else bitsandbytes_usable()
    if not skipped:
        import bitsandbytes
        import peft

        info.update(peft=peft.__version__, bitsandbytes=bitsandbytes.__version__)
    print("machine:", ", ".join(f"{k} {v}" for k, v in info.items()))

    ckpt = Path(args.ckpt)
    if not (ckpt / "config.json").exists():
        t = time.perf_counter()
        print(f"writing a random {args.shape} checkpoint to {ckpt} ...")
        write_random_checkpoint(ckpt, args.shape, args.layers, device=device, verbose=not args.smoke)
        print(f"  {time.perf_counter() - t:.0f} s")
    cfg = ModelConfig.from_file(ckpt / "config.json")
    print(f"checkpoint {ckpt}: {memory.count_parameters(cfg) / 1e9:.2f}B parameters, {cfg.num_hidden_layers} blocks, "
          f"hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}")
    gen = torch.Generator().manual_seed(0)
    batches_by_size = {B: [torch.randint(0, cfg.vocab_size, (B, args.seq), generator=gen)
                           for _ in range(args.warmup + args.steps)] for B in map(int, args.batches.split(","))}

    load, runs, init = run_minitune(args, device, batches_by_size)
    result = dict(machine=info, args={k: str(v) for k, v in vars(args).items()}, hf_skipped=skipped,
                  bf16_model_bytes=2 * memory.count_parameters(cfg), load={"minitune": load},
                  rows=minitune_rows(args, cfg, device, load, runs))
    write_json(args.json, result)  # minitune's side is kept even if the other side fails
    if skipped:
        print(f"transformers + PEFT + bitsandbytes side skipped: {skipped}")
        return result
    load, runs = run_hf(args, device, batches_by_size, init)
    result["load"]["transformers+peft+bnb"] = load
    compare(args, device, result["rows"], load, runs)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
