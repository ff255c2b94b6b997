"""On a CUDA GPU: a Qwen2.5-0.5B-shaped checkpoint in bf16, minitune vs transformers.

    python bench/gpu_parity.py [--layers 24]

No hub here, so the checkpoint is written by transformers from Qwen2.5-0.5B-Instruct's real
config.json values with random weights. Prints the logits' relative error, whether greedy
generation of 32 tokens agrees token for token, load times and tokens/s of both, with the
machine and versions. Exits with a message (code 2) where there is no CUDA device.
"""

import argparse
import statistics
import sys
import tempfile
import time

import torch

# Qwen/Qwen2.5-0.5B-Instruct config.json (the fields that shape the model)
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  bos_token_id=151643, eos_token_id=151645)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check runs on a GPU machine only")
        sys.exit(2)
    import transformers

    import minitune

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": args.layers})
    with tempfile.TemporaryDirectory() as d:
        ref = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        ref.save_pretrained(d)
        del ref
        t = time.perf_counter()
        ours, _ = minitune.load_pretrained(d, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to("cuda").eval()
        torch.cuda.synchronize()
        t_ref = time.perf_counter() - t
    print(f"load: minitune {t_ours:.2f} s, transformers {t_ref:.2f} s; "
          f"{ours.num_parameters() / 1e6:.0f}M parameters")

    ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).float(), ref(ids).logits.float()
    print(f"logits bf16: max rel error {((a - b).abs().max() / b.abs().max()).item():.2e}, "
          f"bit-identical: {torch.equal(a, b)}")

    prompt = ids[:1, :16]
    mine = minitune.generate(ours, prompt, 32)
    theirs = ref.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    print(f"greedy 32 tokens identical: {mine.tolist() == theirs.tolist()}")

    def tok_per_s(fn, n=128, repeats=5):
        fn()
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return n / statistics.median(times)

    a = tok_per_s(lambda: minitune.generate(ours, prompt, 128))
    b = tok_per_s(lambda: ref.generate(prompt, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0))
    print(f"greedy batch 1, 128 new: minitune {a:.0f} tok/s, transformers {b:.0f} tok/s, ratio {a / b:.2f}x")
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
