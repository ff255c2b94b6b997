"""Lesson 03: generation. Read README.md beside this file; every number below is measured here.

    python lessons/03-generation/run.py [--model weights/tiny] [--fast]
"""
import torch

import minitune
from minitune.classroom.claims import claim, finish_claims
from minitune.classroom.lesson import finish, load_or_build, parse_args, section, timed
from minitune.generation import top_k_filter, top_p_filter


@torch.no_grad()
def generate_without_cache(model, ids, n):
    """Greedy, but every step runs the whole sequence again (what the cache saves us from)."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def kv_cache(model, fast: bool, dev: str) -> None:
    """Section 1: time per new token with the cache and without it, for growing prompts; the cache's size."""
    section("1. The KV cache: time per new token with and without it")
    cfg = model.config
    n_new = 8 if fast else 16
    speedup, all_same = [], []
    lengths = [n for n in ((16, 128) if fast else (32, 256, 512)) if n + n_new <= cfg.max_position_embeddings]
    for prompt_len in lengths:
        prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
        t_cache = timed(lambda: minitune.generate(model, prompt, max_new_tokens=n_new), repeat=2)
        result = {}
        t_full = timed(lambda: result.update(ids=generate_without_cache(model, prompt, n_new)), repeat=1)
        same = torch.equal(minitune.generate(model, prompt, max_new_tokens=n_new), result["ids"])
        print(f"prompt {prompt_len:>5} tokens, {n_new} new: with cache {1e3 * t_cache / n_new:7.2f} ms/token, "
              f"without {1e3 * t_full / n_new:7.2f} ms/token (x{t_full / t_cache:.1f}); same tokens: {same}")
        speedup.append(t_full / t_cache)
        all_same.append(same)
    claim("the KV cache gives the same greedy tokens as recomputing the whole sequence", all(all_same),
          f"{sum(all_same)}/{len(all_same)} prompt lengths")
    # wall times: too few tokens in --fast mode, and a busy machine disturbs them; checked in a full run
    claim(f"with the cache a new token costs less than half as much, at a {lengths[-1]}-token prompt",
          None if fast else speedup[-1] > 2, f"x{speedup[-1]:.1f} faster")
    dtype = next(model.parameters()).dtype
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
    print(f"cache size: {kv_per_token:,} bytes per token (keys + values, every layer); "
          f"{kv_per_token * cfg.max_position_embeddings / 2**20:.2f} MiB at the full context of "
          f"{cfg.max_position_embeddings}")


def sampling(model, tok, stand_in: bool, dev: str) -> None:
    """Section 2: greedy, temperature, top-k and top-p on one prompt: how many candidates each leaves."""
    section("2. Greedy, temperature, top-k, top-p on the same prompt (seed 0)")
    text = "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n"
    if tok is None or tok.token_to_id("<|im_start|>") is None:
        text = "Once upon a time"
    print(f"prompt: {text!r}" + ("   (stand-in model: random weights, so the text is noise)" if stand_in else ""))
    prompt = torch.tensor([tok.encode(text)], device=dev)
    with torch.no_grad():
        logits = model(prompt)[:, -1].float()
    settings = [("greedy", dict(temperature=0.0)), ("temperature 0.7", dict(temperature=0.7)),
                ("temperature 1.5", dict(temperature=1.5)), ("top-k 5", dict(temperature=1.0, top_k=5)),
                ("top-p 0.9", dict(temperature=1.0, top_p=0.9))]
    alive_per = {}
    for name, kw in settings:
        lg = logits / kw["temperature"] if kw["temperature"] else logits
        if kw.get("top_k"):
            lg = top_k_filter(lg, kw["top_k"])
        if kw.get("top_p"):
            lg = top_p_filter(lg, kw["top_p"])
        p = lg.softmax(-1)
        alive = int(torch.isfinite(lg).sum()) if kw["temperature"] else 1
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item() if kw["temperature"] else 0.0
        out = minitune.generate(model, prompt, max_new_tokens=24, eos_id=tok.eos_id, seed=0, **kw)
        reply = tok.decode(out[0, prompt.shape[1]:].tolist(), skip_special_tokens=True)
        alive_per[name] = alive
        print(f"{name:16} first step: {alive:>5} candidate tokens, entropy {entropy:.2f} nats | {reply!r}")
    print("(top-k and top-p are shown after temperature 1.0; the candidates are those left after the filter)")
    claim("greedy keeps 1 candidate, top-k 5 keeps 5, top-p 0.9 fewer than the whole vocabulary",
          alive_per["greedy"] == 1 and alive_per["top-k 5"] == 5 and alive_per["top-p 0.9"] < model.config.vocab_size,
          f"{alive_per['greedy']}, {alive_per['top-k 5']}, {alive_per['top-p 0.9']} of {model.config.vocab_size}")


def cost_per_token(model, fast: bool, dev: str) -> None:
    """Section 3: FLOPs and bytes of one new token, this machine's balance point, and the proof that a
    batch of new tokens costs little more than one."""
    section("3. Cost per token: why decoding is memory-bound (arithmetic intensity)")
    cfg = model.config
    dtype = next(model.parameters()).dtype
    n_params = model.num_parameters()
    weight_bytes = n_params * dtype.itemsize
    ctx = min(1024, cfg.max_position_embeddings)
    kv_read = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * ctx * dtype.itemsize
    flops = 2 * n_params + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * ctx
    print(f"one new token at context {ctx}, batch 1, {str(dtype).replace('torch.', '')}:")
    print(f"   FLOPs  ~ 2 x {n_params:,} parameters + attention = {flops / 1e6:.1f} MFLOP")
    print(f"   bytes  ~ every weight once ({weight_bytes / 2**20:.1f} MiB) + the KV cache ({kv_read / 2**20:.2f} MiB)")
    print(f"   arithmetic intensity = FLOPs / bytes = {flops / (weight_bytes + kv_read):.2f} FLOP per byte")

    # measure this machine: a large matmul (compute) and a large copy (memory)
    n = 1024 if fast else 2048
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    t_mm = timed(lambda: a @ b, repeat=3)
    big = torch.randn(64 * 2**20 // 4, device=dev)  # 64 MiB: larger than a CPU's caches or a GPU's L2
    dst = torch.empty_like(big)
    t_copy = timed(lambda: dst.copy_(big), repeat=5)
    flops_s, bytes_s = 2 * n**3 / t_mm, 2 * big.numel() * 4 / t_copy  # a copy reads and writes every byte
    where = f"{torch.get_num_threads()} threads" if dev == "cpu" else torch.cuda.get_device_name()
    print(f"this machine ({where}): matmul {flops_s / 1e9:.1f} GFLOP/s, "
          f"copy {bytes_s / 1e9:.1f} GB/s -> balance point {flops_s / bytes_s:.1f} FLOP per byte")
    intensity1 = flops / (weight_bytes + kv_read)
    bound = "memory" if intensity1 < flops_s / bytes_s else "compute"
    print(f"   batch-1 decoding ({intensity1:.2f} FLOP/byte) is {'below' if bound == 'memory' else 'above'} "
          f"it: {bound} bandwidth is its limit on this machine")
    claim("batch-1 decoding is memory-bound: its arithmetic intensity is below this machine's balance point",
          bound == "memory", f"{intensity1:.2f} vs {flops_s / bytes_s:.1f} FLOP per byte")

    # the proof: one weight matrix times a batch of vectors; time barely grows with the batch
    rows = 2048 if fast else 4096
    W = torch.randn(rows, rows, device=dev)
    print(f"y = linear(x, W) with W {rows}x{rows} fp32 ({W.numel() * 4 / 2**20:.0f} MiB), batch of new tokens:")
    base = None
    for batch in ((1, 4, 16, 64) if fast else (1, 4, 16, 64, 256)):
        x = torch.randn(batch, rows, device=dev)
        t = timed(lambda: torch.nn.functional.linear(x, W), repeat=7)
        base = base or t
        intensity = 2 * batch * rows * rows / (W.numel() * 4 + 2 * batch * rows * 4)
        print(f"   batch {batch:>4}: {1e3 * t:7.2f} ms ({t / base:4.1f}x batch 1's time for {batch}x the tokens), "
              f"{2 * batch * rows * rows / t / 1e9:6.1f} GFLOP/s, intensity {intensity:6.1f} FLOP/byte")
    ids1 = torch.randint(0, cfg.vocab_size, (1, 32), device=dev)
    ids8 = ids1.expand(8, 32).contiguous()
    reps = 2 if fast else 3
    t1 = timed(lambda: minitune.generate(model, ids1, max_new_tokens=16), repeat=reps)
    t8 = timed(lambda: minitune.generate(model, ids8, max_new_tokens=16), repeat=reps)
    print(f"the model itself: batch 1 {16 / t1:.0f} tokens/s, batch 8 {8 * 16 / t8:.0f} tokens/s "
          f"(x{(8 * 16 / t8) / (16 / t1):.1f} throughput for {t8 / t1:.1f}x the time)")
    claim("a batch of 8 decodes more tokens per second than batch 1", None if fast else t8 / t1 < 8,
          f"x{(8 * 16 / t8) / (16 / t1):.1f} throughput")


def main():
    args = parse_args(__doc__)
    model, tok, folder, stand_in = load_or_build(args)
    kv_cache(model, args.fast, args.device)
    sampling(model, tok, stand_in, args.device)
    cost_per_token(model, args.fast, args.device)
    finish("03")
    finish_claims(args.fast, args.model)


if __name__ == "__main__":
    main()
