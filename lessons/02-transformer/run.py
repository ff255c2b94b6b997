"""Lesson 02: the transformer. Read README.md beside this file; every number below is measured here.

    python lessons/02-transformer/run.py [--model weights/tiny] [--fast]
"""
import math
import time

import torch
import torch.nn.functional as F

from minitune.classroom.claims import claim, finish_claims
from minitune.classroom.lesson import finish, load_or_build, parse_args, section
from minitune.model import load_model
from minitune.model.checkpoint import read_header, read_tensor, weight_files
from minitune.model.rope import apply_rope, rope_cos_sin
from minitune.model.transformer import AttentionInputs


def rmsnorm(model, ids) -> torch.Tensor:
    """Section 1: layer 0's input_layernorm against its formula, and against LayerNorm.
    Returns the input it saw (the embeddings of ``ids``), which sections 3 and 4 reuse."""
    section("1. RMSNorm: divide by the root mean square, no mean subtracted, no bias")
    captured = {}
    norm = model.model.layers[0].input_layernorm
    hook = norm.register_forward_hook(lambda m, i, o: captured.update(x=i[0], y=o))
    with torch.no_grad():
        model(ids)
    hook.remove()
    x, y = captured["x"].float(), captured["y"].float()
    w = norm.weight.float()
    formula = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    print(f"input to layer 0's input_layernorm: mean {x.mean():+.4f}, rms {x.pow(2).mean().sqrt():.4f}")
    print(f"output / weight has rms {(y / w).pow(2).mean(-1).sqrt().mean():.4f} (1 by construction)")
    dtype = next(model.parameters()).dtype
    note = "" if dtype == torch.float32 else f" (the module's output is rounded to {str(dtype).replace('torch.', '')})"
    print(f"max |module - formula| = {(y - formula).abs().max():.2e}{note}")
    claim("layer 0's RMSNorm module computes the formula w * x / sqrt(mean(x^2) + eps)",
          (y - formula).abs().max() <= tolerance(dtype) * formula.abs().max(),
          f"max |module - formula| = {(y - formula).abs().max():.2e} (largest |value| {formula.abs().max():.1f})")
    ln = F.layer_norm(x, (x.shape[-1],), w, None, norm.eps)
    print(f"LayerNorm (mean subtracted too) would differ by up to {(ln - y).abs().max():.3f} here")
    return captured["x"]


def rope(model) -> None:
    """Section 2: RoPE keeps a vector's norm, and q . k depends on the distance m - n only."""
    section("2. RoPE: rotate channel pairs by position; dot products then depend on distance only")
    cfg = model.config
    d = cfg.head_dim
    inv_freq = model.inv_freq.float().cpu()
    wavelengths = 2 * math.pi / inv_freq
    print(f"theta = {cfg.rope_theta:g}: {d // 2} channel pairs, wavelengths from {wavelengths[0]:.1f} to "
          f"{wavelengths[-1]:,.0f} positions")
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def rotated(v, m):
        cos, sin = rope_cos_sin(inv_freq, torch.tensor([[m]]), torch.float32)
        return apply_rope(v, cos, sin)

    norms = [abs(rotated(q, m).norm() - q.norm()).item() for m in range(0, 4096, 97)]
    print(f"norm preserved: max | |rope(q, m)| - |q| | over 43 positions = {max(norms):.2e}")
    print("q_m . k_n for pairs with the same distance m - n = 3, and one with distance 5:")
    dots = {}
    for m, n in ((3, 0), (10, 7), (500, 497), (3000, 2997), (10, 5)):
        dots[m, n] = (rotated(q, m) * rotated(k, n)).sum().item()
        print(f"   m={m:>5} n={n:>5}  m-n={m - n}:  {dots[m, n]:+.6f}")
    claim("RoPE keeps a vector's norm at every position", max(norms) < 1e-4, f"max norm change {max(norms):.2e}")
    same = [dots[3, 0], dots[10, 7], dots[500, 497], dots[3000, 2997]]
    spread = max(same) - min(same)
    claim("q_m . k_n depends on m - n only (four pairs at distance 3 agree; distance 5 differs)",
          spread < 1e-3 and abs(dots[10, 5] - dots[3, 0]) > 10 * spread,
          f"distance 3: spread {spread:.1e}; distance 5 differs by {abs(dots[10, 5] - dots[3, 0]):.3f}")


def kv_bytes(layers, kv_heads, head_dim, nbytes):
    """Bytes the KV cache holds per token: keys and values, every layer."""
    return 2 * layers * kv_heads * head_dim * nbytes


def gqa(model, x0) -> torch.Tensor:
    """Section 3: the KV cache per token with and without shared heads, and layer 0's attention against
    plain multi-head attention on repeated keys/values. Returns the normed input ``xa`` it attended over."""
    section("3. GQA: query heads share key/value heads; the KV cache shrinks by the group size")
    cfg = model.config
    H, K, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    elt = torch.tensor([], dtype=next(model.parameters()).dtype).element_size()
    print(f"this model: {H} query heads / {K} kv heads = groups of {H // K}")
    for name, (L, h, kv, hd) in {"this model": (cfg.num_hidden_layers, H, K, d),
                                 "Qwen2.5-0.5B config": (24, 14, 2, 64),
                                 "Llama-3-8B config": (32, 32, 8, 128)}.items():
        nb = elt if name == "this model" else 2  # real checkpoints in bf16
        gqa, mha = kv_bytes(L, kv, hd, nb), kv_bytes(L, h, hd, nb)
        print(f"   {name:20} KV cache per token: {gqa / 1024:8.1f} KiB with GQA, {mha / 1024:8.1f} KiB if every "
              f"head had its own K/V (x{mha / gqa:.0f});  32k tokens: {gqa * 32768 / 2**30:.2f} GiB")
    block0 = model.model.layers[0]
    attn = block0.self_attn
    xa = block0.input_layernorm(x0)
    B, T, _ = xa.shape
    with torch.no_grad():
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(T, device=xa.device).expand(B, T), xa.dtype)
        ours = attn(xa, AttentionInputs(cos, sin, is_causal=True), None, 0)
        qh = apply_rope(attn.q_proj(xa).view(B, T, H, d).transpose(1, 2), cos, sin)
        kh = apply_rope(attn.k_proj(xa).view(B, T, K, d).transpose(1, 2), cos, sin)
        vh = attn.v_proj(xa).view(B, T, K, d).transpose(1, 2)
        kh, vh = kh.repeat_interleave(H // K, 1), vh.repeat_interleave(H // K, 1)  # plain MHA on copies
        mha = attn.o_proj(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2)
                          .reshape(B, T, H * d))
    print(f"layer 0 attention with shared heads vs. MHA on repeated K/V: max |diff| = {(ours - mha).abs().max():.2e}")
    claim("GQA equals plain multi-head attention on repeated key/value heads",
          (ours - mha).abs().max() <= tolerance(xa.dtype) * mha.abs().max(), f"max |diff| = {(ours - mha).abs().max():.2e}")
    return xa


def swiglu(model, xa) -> None:
    """Section 4: layer 0's MLP against the SwiGLU formula, and its parameter count."""
    section("4. SwiGLU: down( silu(gate x) * up x )")
    cfg = model.config
    mlp = model.model.layers[0].mlp
    h, i = cfg.hidden_size, cfg.intermediate_size
    with torch.no_grad():
        g = mlp.gate_proj(xa)
        out = mlp(xa)
        formula = mlp.down_proj(g * torch.sigmoid(g) * mlp.up_proj(xa))
    print(f"max |module - formula| = {(out - formula).abs().max():.2e}")
    claim("layer 0's MLP computes down(silu(gate x) * up x)",
          (out - formula).abs().max() <= tolerance(xa.dtype) * formula.abs().max(),
          f"max |module - formula| = {(out - formula).abs().max():.2e} (largest |value| {formula.abs().max():.1f})")
    print(f"parameters: 3 x {h} x {i} = {3 * h * i:,} (a GELU MLP with 4x width would have 8 x {h}^2 = {8 * h * h:,})")
    print(f"silu(gate) is negative (a small 'leak') for {(F.silu(g) < 0).float().mean():.0%} of the units here")


def safetensors_header(model, folder) -> None:
    """Section 5: the header of the checkpoint file, one tensor read alone, and load_model's time."""
    section("5. Loading a checkpoint tensor by tensor: the safetensors header")
    dtype = next(model.parameters()).dtype
    files = weight_files(folder)
    with open(files[0], "rb") as f:
        header, data_start = read_header(f, files[0])
        print(f"{files[0].name}: {files[0].stat().st_size:,} bytes; first 8 bytes say the JSON header is "
              f"{data_start - 8:,} bytes; tensor data starts at byte {data_start:,}")
        for name, info in list(header.items())[:8]:
            print(f"   {name:48} {info['dtype']:5} {str(info['shape']):14} bytes {info['data_offsets']}")
        print(f"   ... {len(header)} tensors in all")
        name = "model.layers.0.self_attn.q_proj.weight"
        t = read_tensor(f, header[name], data_start)
    alone = torch.equal(t.to(dtype), model.get_parameter(name).detach().cpu())
    print(f"read {name} alone ({t.numel() * t.element_size():,} bytes): equal to the loaded model's: {alone}")
    claim("one tensor read alone through the safetensors header equals the loaded model's", alone, str(alone))
    start = time.perf_counter()
    load_model(folder, dtype=dtype)
    print(f"load_model (meta device, then one tensor at a time): {time.perf_counter() - start:.2f} s")


def parity(model, folder, ids, device: str) -> None:
    """Section 6: transformers loads the same folder; the logits must agree (skipped without transformers)."""
    section("6. Parity with the reference implementation (transformers)")
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: parity check skipped (pip install -e '.[test]' to run it)")
        claim("transformers gives the same logits and the same argmax everywhere", None)
        return
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype)
    ref = ref.eval().to(device)
    with torch.no_grad():
        a, b = model(ids).float(), ref(ids).logits.float()
    print(f"transformers {transformers.__version__} loaded the same folder in {time.perf_counter() - start:.1f} s")
    print(f"logits {tuple(a.shape)}: max |minitune - transformers| = {(a - b).abs().max():.2e}, "
          f"relative {((a - b).abs().max() / b.abs().max()):.2e}; same argmax everywhere: "
          f"{torch.equal(a.argmax(-1), b.argmax(-1))}")
    relative = ((a - b).abs().max() / b.abs().max()).item()
    claim("transformers gives the same logits and the same argmax everywhere",
          relative <= tolerance(next(model.parameters()).dtype) and torch.equal(a.argmax(-1), b.argmax(-1)),
          f"relative max |diff| {relative:.2e}")


def tolerance(dtype) -> float:
    """How far two ways of computing the same thing may differ, relative to the largest value: float32
    rounding, or bf16/fp16's: a bf16 result keeps 8 significant bits, and two roundings are ~1e-2 relative."""
    return 1e-5 if dtype == torch.float32 else 2e-2


def main():
    args = parse_args(__doc__)
    model, tok, folder, stand_in = load_or_build(args)
    cfg = model.config
    print(f"{cfg.architecture}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} "
          f"query heads, {cfg.num_key_value_heads} key/value heads, head_dim {cfg.head_dim}, MLP "
          f"{cfg.intermediate_size}, vocab {cfg.vocab_size}, tied head: {cfg.tie_word_embeddings}")
    torch.manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (1, 16 if args.fast else 64), device=args.device)  # random token ids
    x0 = rmsnorm(model, ids)
    rope(model)
    xa = gqa(model, x0)
    swiglu(model, xa)
    safetensors_header(model, folder)
    parity(model, folder, ids, args.device)
    finish("02")
    finish_claims(args.fast, args.model)  # every claim here is about the code: checked in --fast mode too


if __name__ == "__main__":
    main()
