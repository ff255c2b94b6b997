"""Decode speed against the memory-bandwidth bound: minitune's three decode paths beside transformers'.

    python bench/bench_decode_gpu.py [--shapes 0.5b,1.5b] [--batches 1,8] [--new-tokens 128]
                                     [--repeats 3] [--no-compile] [--json decode.json]
    python bench/bench_decode_gpu.py --smoke      # CPU, a tiny shape, seconds (tests/test_static_cache.py)

Random checkpoints of Qwen2.5-0.5B's and Qwen2.5-1.5B's shapes (their config.json values) are built
in memory by transformers, in bf16 on the GPU; minitune's model gets the same weights. For each shape
and batch size (prompts of 16 random tokens, greedy, `--new-tokens` new tokens each, no EOS) it times
generation end to end (prefill included) with, alternating between them so drift hits all alike:

    minitune plain            generate(...): the plain loop with the dynamic KV cache
    minitune static           generate(..., static_cache=cache): fixed-shape step, run eagerly
    minitune static+graph     generate(..., static_cache=cache, cuda_graph=True): the step replayed as a
                              CUDA graph captured by hand (once per cache; the capture time is printed)
    minitune static+compile   the same step under torch.compile(mode="reduce-overhead", fullgraph=True):
                              CUDA graphs plus kernel fusion (the choice static_cache.py did not make)
    transformers eager        model.generate(...) with its dynamic cache
    transformers static       model.generate(..., cache_implementation="static", disable_compile=True)
    transformers static+compile  cache_implementation="static": transformers compiles the forward itself

tokens/s = batch x new tokens / median time. The bandwidth bound is what a step must read, over the
measured copy bandwidth (a large device-to-device copy, read + write bytes / time):

    bytes/step = weight bytes (the embedding table counted once if tied: the LM head reads it; not at
                 all if untied: the lookup reads B rows) + KV cache at the mean context
                 (2 x layers x B x kv_heads x (prompt + new/2) x head_dim x bytes)
    bound tokens/s = B x bandwidth / bytes/step;   fraction = tokens/s / bound

Each row also says whether its tokens equal minitune plain's (and where they first differ). The
machine, driver and versions are printed and written with every row to `--json` (rewritten after each
row, so a run cut short keeps what it measured). Without a CUDA device it exits with code 2 unless
--smoke, which runs a tiny fp32 shape on the CPU, without the compiled variants.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch._dynamo
import transformers

import minitune
from minitune.model import ModelConfig, StaticKVCache, Transformer
from minitune.model.static_cache import decode_step, prefill

# Qwen/Qwen2.5-{0.5B,1.5B}-Instruct config.json (the fields that shape the model)
SHAPES = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                 bos_token_id=151643, eos_token_id=151645),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                 bos_token_id=151643, eos_token_id=151645),
    "smoke": dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2),
}
COMMON = dict(max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)


def machine_info(device: str) -> dict:
    info = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), platform=platform.platform(),
                cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(), python=sys.version.split()[0],
                torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda)
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int, repeats: int = 20) -> float:
    """Bytes/s of a large device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def build(shape: str, device: str, dtype: torch.dtype):
    """transformers' random model of the shape, and minitune's Transformer holding the same weights."""
    cfg = transformers.Qwen2Config(**SHAPES[shape], **COMMON)
    torch.manual_seed(0)
    with torch.device(device):
        ref = transformers.Qwen2ForCausalLM(cfg).to(dtype).eval()
        ours = Transformer(ModelConfig.from_hf_dict(json.loads(cfg.to_json_string()))).to(dtype).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ours.tie_weights()
    return ref, ours


def step_bytes(model: Transformer, batch: int, context: float) -> float:
    """Bytes one decode step must read: the weights once (shared by the batch) + each row's KV cache."""
    cfg = model.config
    weights = {id(p): p for p in model.parameters()}.values()
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)
    if not cfg.tie_word_embeddings:  # the lookup reads B rows of the table, not all of it
        w = model.model.embed_tokens.weight
        weight_bytes -= w.numel() * w.element_size()
    value_bytes = model.model.embed_tokens.weight.element_size()
    kv_bytes = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * context * cfg.head_dim * value_bytes
    return weight_bytes + kv_bytes


def compiled_static_generate(model, ids, n, cache, step):
    """Greedy decoding like generate(static_cache=...), with `step` a compiled decode_step."""
    with torch.inference_mode():
        B, T = ids.shape
        mask = torch.ones_like(ids)
        position_ids = torch.arange(T, device=ids.device).expand(B, T)
        logits = prefill(model, cache, ids, mask, position_ids)
        column = torch.full((1,), T, dtype=torch.long, device=ids.device)
        position_ids, out = position_ids[:, -1:], [ids]
        for i in range(n):
            tok = logits.argmax(-1)[:, None]  # read before the next replay overwrites the graph's output
            out.append(tok)
            if i == n - 1:
                break
            position_ids = position_ids + 1
            torch.compiler.cudagraph_mark_step_begin()
            logits = step(model, cache, tok, position_ids, column)
            column += 1
        return torch.cat(out, dim=1)


def variants(ref, ours, ids, n, device, compile_them):
    """name -> a function that generates n tokens for ids; prints how long setting each up took."""
    hf = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    B, T = ids.shape
    out = {"minitune plain": lambda: minitune.generate(ours, ids, n)}
    static = StaticKVCache.for_model(ours, B, T + n)
    out["minitune static"] = lambda: minitune.generate(ours, ids, n, static_cache=static)
    if device == "cuda":
        graphed = StaticKVCache.for_model(ours, B, T + n)
        t = time.perf_counter()
        minitune.generate(ours, ids, 2, static_cache=graphed, cuda_graph=True)  # captures the graph once
        sync(device)
        print(f"  CUDA graph capture + a 2-token generation: {time.perf_counter() - t:.3f} s")
        out["minitune static+graph"] = lambda: minitune.generate(ours, ids, n, static_cache=graphed, cuda_graph=True)
        if compile_them:
            cache_c = StaticKVCache.for_model(ours, B, T + n)
            for buf in (cache_c.keys, cache_c.values, cache_c.key_mask):
                torch._dynamo.mark_static_address(buf)  # updated in place by the graph, never copied in
            step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
            out["minitune static+compile"] = lambda: compiled_static_generate(ours, ids, n, cache_c, step)
    out["transformers eager"] = lambda: ref.generate(ids, **hf)
    out["transformers static"] = lambda: ref.generate(ids, cache_implementation="static", disable_compile=True, **hf)
    if device == "cuda" and compile_them:
        out["transformers static+compile"] = lambda: ref.generate(ids, cache_implementation="static", **hf)
    return out


def first_difference(a: torch.Tensor, b: torch.Tensor, prompt_len: int):
    """Index of the first new token where a and b differ in any row; None if they agree."""
    if a.shape != b.shape:
        return 0
    diff = (a[:, prompt_len:] != b[:, prompt_len:]).any(0).nonzero()
    return int(diff[0]) if len(diff) else None


def measure(shape, batch, ref, ours, args, device, bandwidth):
    gen = torch.Generator(device).manual_seed(batch)
    ids = torch.randint(3, ours.config.vocab_size, (batch, args.prompt), device=device, generator=gen)
    n = args.new_tokens
    runs = variants(ref, ours, ids, n, device, not args.no_compile)
    outputs = {}
    for name, fn in runs.items():  # warm-up: allocations, cuBLAS plans, compilation (and its recording run)
        t = time.perf_counter()
        outputs[name] = fn()
        if "compile" in name:
            fn()
        sync(device)
        print(f"  warm-up {name}: {time.perf_counter() - t:.1f} s")
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # alternate the variants within each round
        for name, fn in runs.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    bound = batch * bandwidth / step_bytes(ours, batch, args.prompt + n / 2)
    rows, plain = [], outputs["minitune plain"]
    for name in runs:
        tps = batch * n / statistics.median(times[name])
        diff = first_difference(outputs[name], plain, args.prompt)
        rows.append(dict(shape=shape, batch=batch, variant=name, new_tokens=n, prompt_tokens=args.prompt,
                         dtype=str(args.dtype).replace("torch.", ""), median_s=statistics.median(times[name]),
                         times_s=times[name], tokens_per_s=tps, bound_tokens_per_s=bound,
                         fraction_of_bandwidth_limit=tps / bound, tokens_identical_to_plain=diff is None,
                         first_difference=diff))
    eager = next(r["tokens_per_s"] for r in rows if r["variant"] == "transformers eager")
    for r in rows:
        r["vs_transformers_eager"] = r["tokens_per_s"] / eager
        print(f"  {r['variant']:<28} {r['tokens_per_s']:9.1f} tok/s  {100 * r['fraction_of_bandwidth_limit']:5.1f}% "
              f"of bound  {r['vs_transformers_eager']:5.2f}x tf eager  same tokens: {r['tokens_identical_to_plain']}"
              + ("" if r["tokens_identical_to_plain"] else f" (first differs at new token {r['first_difference']})"))
    return rows


def write_json(path, result):
    if path:
        tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="0.5b,1.5b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth copy")
    ap.add_argument("--no-compile", action="store_true", help="skip the two torch.compile variants (minutes)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, a few tokens: checks the script runs")
    ap.add_argument("--json", default=None, help="write every row, the machine and the versions here")
    args = ap.parse_args(argv)
    if args.smoke:
        device, args.dtype = "cpu", torch.float32
        args.shapes, args.batches, args.new_tokens, args.repeats, args.copy_mib = "smoke", "1,3", 8, 2, 16
        args.no_compile = True
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU machine (or with --smoke on the CPU)")
        sys.exit(2)
    else:
        device, args.dtype = "cuda", torch.bfloat16
    info = machine_info(device)
    print("machine:", ", ".join(f"{k} {v}" for k, v in info.items()))
    bandwidth = copy_bandwidth(device, args.copy_mib * 2**20)
    print(f"copy bandwidth ({args.copy_mib} MiB, read + write): {bandwidth / 1e9:.0f} GB/s")
    result = dict(machine=info, copy_bandwidth_bytes_per_s=bandwidth, args={k: str(v) for k, v in vars(args).items()},
                  rows=[])
    for shape in args.shapes.split(","):
        ref, ours = build(shape, device, args.dtype)
        print(f"\n{shape}: {ours.num_parameters() / 1e6:.1f}M parameters, {args.dtype}")
        for batch in map(int, args.batches.split(",")):
            print(f" batch {batch}, prompt {args.prompt}, {args.new_tokens} new tokens, {args.repeats} repeats")
            result["rows"] += measure(shape, batch, ref, ours, args, device, bandwidth)
            write_json(args.json, result)
        del ref, ours
        if device == "cuda":
            print(f" peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
            torch.cuda.empty_cache()
    write_json(args.json, result)


if __name__ == "__main__":
    main()
