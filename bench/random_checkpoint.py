"""A random checkpoint of a real model's shape, written shard by shard: never the whole model in memory.

    python bench/random_checkpoint.py OUT [--shape qwen2.5-7b] [--layers N] [--layers-per-shard 4]
                                          [--device cuda] [--seed 0]

Benchmarks of a 7B-shaped model need its checkpoint on disk (QLoRA loads it straight into NF4), but
not its trained weights: the time and the memory of a step depend on the shapes only. A Qwen2.5-7B
shape in bf16 is ~15 GB of safetensors; building the model first and saving it would hold those
15 GB in host memory (and a training machine may not have them to spare). So this writes the
tensors group by group instead: the embedding, then `--layers-per-shard` blocks at a time, then the
final norm and the LM head, each group drawn, written as one safetensors shard and dropped before
the next is drawn. Host memory peaks at one shard (4 blocks of the 7B shape: ~1.9 GB).

The folder is the one `save_pretrained` writes for a sharded model (config.json in the classic form,
model-0000i-of-0000n.safetensors, model.safetensors.index.json), so minitune's `load_model` and
transformers' `from_pretrained` both read it. It is written under a temporary name and renamed at
the end (minitune.atomic): a run cut short leaves no half checkpoint under OUT.

Values: linear and embedding weights ~ N(0, 0.02^2) (the init of Transformer._init_weights), biases
~ N(0, 0.02^2), RMSNorm weights 1; drawn on `--device` (a GPU draws 7B numbers in a second, a CPU in
a minute) from a generator seeded per tensor, so a tensor's values depend on (seed, name, device) only.
"""

import argparse
import json
import time
import zlib
from pathlib import Path

import torch

from minitune.atomic import atomic_dir
from minitune.model import ModelConfig, Transformer
from minitune.model.checkpoint import INDEX_FILE, save_safetensors

# config.json fields of the shapes (Qwen/Qwen2.5-7B and -0.5B's own values); "tiny" is for CPU tests
SHAPES = {
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                       max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151643),
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                 max_position_embeddings=4096, bos_token_id=1, eos_token_id=2),
}
QWEN2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6,
             rope_theta=1000000.0, use_sliding_window=False, sliding_window=None, max_window_layers=28,
             attention_dropout=0.0, initializer_range=0.02, use_cache=True)


def hf_config(shape: str, layers: int | None = None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The config.json of `shape` (optionally with fewer or more blocks), in the classic HF form."""
    d = {**QWEN2, **SHAPES[shape], "torch_dtype": str(dtype).replace("torch.", "")}
    if layers is not None:
        d["num_hidden_layers"] = layers
    return d


def shard_groups(names: list[str], n_layers: int, layers_per_shard: int) -> list[list[str]]:
    """The tensor names cut into shards: [embedding], [blocks 0..k-1], [blocks k..2k-1], ..., [norm + head]."""
    def block(name):
        return int(name.split(".")[2]) if name.startswith("model.layers.") else None
    groups = [[n for n in names if n.startswith("model.embed_tokens.")]]
    for first in range(0, n_layers, layers_per_shard):
        groups.append([n for n in names if block(n) is not None and first <= block(n) < first + layers_per_shard])
    groups.append([n for n in names if n not in {m for g in groups for m in g}])  # final norm, lm_head
    return [g for g in groups if g]


def random_tensor(name: str, shape: tuple, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """Norm weights 1, everything else N(0, 0.02^2); the generator is seeded from (seed, name)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=g)
    return t.cpu()


def write_random_checkpoint(out_dir, shape: str = "qwen2.5-7b", layers: int | None = None, layers_per_shard: int = 4,
                            dtype: torch.dtype = torch.bfloat16, device="cpu", seed: int = 0, verbose: bool = False) -> Path:
    """Write the random checkpoint of `shape` into out_dir (replaced if there), one shard at a time."""
    config = hf_config(shape, layers, dtype)
    cfg = ModelConfig.from_hf_dict(config)
    with torch.device("meta"):  # the names and shapes only: no memory
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # the head reads the embedding; the file does not store it
    groups = shard_groups(list(shapes), cfg.num_hidden_layers, layers_per_shard)
    weight_map, total, t0 = {}, 0, time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        for i, group in enumerate(groups, 1):
            file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            shard = {name: random_tensor(name, shapes[name], dtype, device, seed) for name in group}
            save_safetensors(shard, tmp / file, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in shard.values())
            weight_map.update(dict.fromkeys(group, file))
            del shard  # before the next group is drawn: one shard in memory at a time
            if verbose:
                print(f"  {file}: {len(group)} tensors, {total / 1e9:.2f} GB so far, {time.perf_counter() - t0:.0f} s")
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(out_dir)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", default="qwen2.5-7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="number of blocks (default: the shape's own)")
    ap.add_argument("--layers-per-shard", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where values are drawn")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t = time.perf_counter()
    path = write_random_checkpoint(args.out, args.shape, args.layers, args.layers_per_shard,
                                   getattr(torch, args.dtype), args.device, args.seed, verbose=True)
    print(f"wrote {path} in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
