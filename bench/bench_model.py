"""minitune vs transformers on the CPU, side by side in one run, on the same checkpoint.

    python bench/bench_model.py [--repeats 7] [--new-tokens 128] [--threads N]

Two measurements on one ~6M-parameter Qwen2-shaped checkpoint (written by transformers):
  1. greedy generation, batch 1, 128 new tokens (KV cache on both sides): tokens/s;
  2. one forward+backward step of the causal-LM loss, batch 8 x 256 tokens: tokens/s;
and a third that isolates the per-token overhead of each generate loop: the same 6-layer layout
with hidden size 16, so the matrix products cost next to nothing. Batch-1 decoding of the 6M model
reads all 24 MB of fp32 weights for every token; that part is the same work on both sides and
bounds the ratio of (1), whatever the loop around it saves.
Runs alternate (ours, theirs, ours, ...) after a warm-up, so drift on a shared machine hits both
sides alike; medians and their ratio are printed with the machine and library versions.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers

import minitune

CONFIG = dict(vocab_size=6000, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
              max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def write_checkpoint(path, **overrides):
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**CONFIG, **overrides}))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(name, ours, theirs, n_tokens, repeats):
    ours(), theirs()  # warm-up: first-call allocations, lazy imports
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours.append(timed(ours))
        t_theirs.append(timed(theirs))
    a, b = n_tokens / statistics.median(t_ours), n_tokens / statistics.median(t_theirs)
    print(f"{name:<34} minitune {a:9.1f} tok/s   transformers {b:9.1f} tok/s   ratio {a / b:5.2f}x")
    return a / b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"versions: python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, minitune {getattr(minitune, '__version__', 'dev')}")

    with tempfile.TemporaryDirectory() as d:
        n_params = write_checkpoint(d)
        ours, _ = minitune.load_pretrained(d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    print(f"checkpoint: Qwen2 layout, {n_params / 1e6:.1f}M parameters, fp32, {args.repeats} alternating repeats\n")

    prompt = torch.randint(3, CONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    compare(f"greedy generate, batch 1, {n} new", lambda: minitune.generate(ours, prompt, n),
            lambda: theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    pad_token_id=0), n, args.repeats)

    batch = torch.randint(3, CONFIG["vocab_size"], (8, 256), generator=torch.Generator().manual_seed(1))

    def step(model, logits_of):
        model.zero_grad(set_to_none=True)
        logits = logits_of(batch)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).backward()

    ours.train(), theirs.train()
    compare("forward+backward, batch 8 x 256", lambda: step(ours, ours),
            lambda: step(theirs, lambda x: theirs(x).logits), batch.numel(), args.repeats)

    with tempfile.TemporaryDirectory() as d:  # the loop's own cost: same layers, negligible matmuls
        write_checkpoint(d, vocab_size=64, hidden_size=16, intermediate_size=32)
        small, _ = minitune.load_pretrained(d)
        small_ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    p = prompt % 64
    compare(f"loop overhead (hidden 16), {n} new", lambda: minitune.generate(small, p, n),
            lambda: small_ref.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       pad_token_id=0), n, args.repeats)


if __name__ == "__main__":
    main()
