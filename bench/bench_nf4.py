"""GPU benchmark of NF4 dequantization and of a 4-bit linear forward.

    python bench/bench_nf4.py [--json results.json] [--reps 50]

For each weight shape it reports, as medians over --reps timed runs (CUDA events):
  * the Triton dequant kernel (NF4 + double quant -> bf16): effective GB/s, counting
    the bytes it must move (packed weights and constants read, bf16 weights written);
  * the measured device-to-device copy bandwidth (torch copy_ of as many bytes as the
    kernel moves: read + written), and the kernel's share of it (goal: >= 70%);
  * bitsandbytes' CUDA dequantize_4bit of the same weight, where importable;
  * a Linear4bit forward vs an nn.Linear in bf16 for a few token counts.
Each time is taken two ways: "gpu", the GPU's time alone (the launch is queued
behind a short busy-wait kernel, so the host's Python and launch cost is not
counted: this gives the kernel's bandwidth), and "call", events around one call
from an idle GPU (the host's cost is counted where it exceeds the GPU's: what one
isolated call costs).  It also checks that the compiled kernel gives the same bits
as the PyTorch reference.  The machine and library versions go with the figures.  Needs a CUDA GPU.
"""
import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]
TOKENS = [1, 16, 512, 4096]


def timed(fn, reps, warmup=5, gpu_only=False):
    """Median milliseconds of fn() over `reps` runs, each timed with CUDA events.

    With gpu_only, the GPU first spins ~0.5 ms (torch.cuda._sleep), so fn's
    kernels are already queued when the start event is reached: the time is the
    GPU's alone.  Without it, the GPU idles between runs and waits for the host
    to issue fn's launches, and that wait is in the time too."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if gpu_only:
            torch.cuda._sleep(1_000_000)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def versions():
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "platform": platform.platform()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import bitsandbytes
        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        info["bitsandbytes"] = None
    props = torch.cuda.get_device_properties(0)
    info["gpu"] = props.name
    info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    info["sm_count"] = props.multi_processor_count
    return info


def bnb_dequant(w):
    """A closure timing bitsandbytes' CUDA dequant of w, or None if it is not usable."""
    try:
        import bitsandbytes.functional as bnbF

        packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                           quant_type="nf4")
        bnbF.dequantize_4bit(packed, state)
        torch.cuda.synchronize()
    except Exception as e:  # not installed, or no CUDA build for this machine
        print(f"  (bitsandbytes CUDA dequant unavailable: {type(e).__name__}: {e})")
        return None
    return lambda: bnbF.dequantize_4bit(packed, state)


def bench_dequant(shape, reps):
    from minitune.quant.nf4 import dequantize_nf4, nbytes, quantize_nf4
    from minitune.quant.nf4_triton import dequantize_nf4_triton

    w = (0.02 * torch.randn(shape, device="cuda")).to(torch.bfloat16)
    q = quantize_nf4(w, blocksize=64, double_quant=True)
    out = dequantize_nf4_triton(q, torch.bfloat16)
    identical = torch.equal(out, dequantize_nf4(q, torch.bfloat16))
    moved = nbytes(q) + out.numel() * out.element_size()  # read the 4-bit form, write bf16

    src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    fns = {"triton": lambda: dequantize_nf4_triton(q, torch.bfloat16),
           "copy": lambda: dst.copy_(src)}  # the copy reads moved/2 bytes, writes moved/2
    bnb = bnb_dequant(w)
    if bnb is not None:
        fns["bnb"] = bnb
    row = {"shape": list(shape), "bytes_moved": moved, "bit_identical_to_reference": identical}
    for how in ("gpu", "call"):
        for name, fn in fns.items():
            ms = timed(fn, reps, gpu_only=how == "gpu")
            row[f"{name}_{how}_ms"], row[f"{name}_{how}_GBps"] = ms, moved / ms / 1e6
        row[f"triton_vs_copy_{how}"] = row[f"triton_{how}_GBps"] / row[f"copy_{how}_GBps"]
        if bnb is not None:
            row[f"triton_speedup_vs_bnb_{how}"] = row[f"bnb_{how}_ms"] / row[f"triton_{how}_ms"]
    return row


def bench_linear(shape, reps):
    from minitune.quant.linear4bit import Linear4bit

    out_f, in_f = shape
    dense = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
    q4 = Linear4bit.from_linear(dense, blocksize=64, double_quant=True,
                                compute_dtype=torch.bfloat16)
    rows = []
    with torch.no_grad():
        for t in TOKENS:
            x = torch.randn(t, in_f, device="cuda", dtype=torch.bfloat16)
            row = {"shape": list(shape), "tokens": t}
            for how in ("call", "gpu"):
                for name, fn in (("bf16", lambda: dense(x)), ("nf4", lambda: q4(x))):
                    row[f"{name}_{how}_ms"] = timed(fn, reps, gpu_only=how == "gpu")
                row[f"nf4_over_bf16_{how}"] = row[f"nf4_{how}_ms"] / row[f"bf16_{how}_ms"]
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_nf4: no CUDA GPU here (torch.cuda.is_available() is False); this "
              "benchmark times GPU kernels and has nothing to measure on CPU. Run it on a "
              "machine with an NVIDIA GPU.", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_nf4: triton is not installed; the kernel under test needs it.", file=sys.stderr)
        return 2

    result = {"machine": versions(), "reps": args.reps, "dequant": [], "linear": []}
    print(json.dumps(result["machine"]))
    for shape in SHAPES:
        row = bench_dequant(shape, args.reps)
        result["dequant"].append(row)
        for how in ("gpu", "call"):
            bnb = (f"  bnb {row[f'bnb_{how}_GBps']:7.1f} GB/s "
                   f"(triton {row[f'triton_speedup_vs_bnb_{how}']:.2f}x)" if "bnb_gpu_ms" in row else "")
            print(f"dequant {shape} {how:4}: triton {row[f'triton_{how}_ms']:.4f} ms "
                  f"{row[f'triton_{how}_GBps']:7.1f} GB/s = {100 * row[f'triton_vs_copy_{how}']:.1f}% "
                  f"of copy {row[f'copy_{how}_GBps']:7.1f} GB/s{bnb}"
                  f"  identical={row['bit_identical_to_reference']}")
    for shape in SHAPES[:2]:
        for row in bench_linear(shape, args.reps):
            result["linear"].append(row)
            print(f"linear {shape} tokens={row['tokens']:5d}: " + ";  ".join(
                f"{how} bf16 {row[f'bf16_{how}_ms']:.3f} ms, nf4 {row[f'nf4_{how}_ms']:.3f} ms "
                f"({row[f'nf4_over_bf16_{how}']:.2f}x)" for how in ("call", "gpu")))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
