"""Lesson 04: the tiny model: its shape, its parameter count, memory math, bf16 vs fp16, what pretraining taught it.

    python lessons/04-tiny-model/run.py                  # weights/tiny on CPU
    python lessons/04-tiny-model/run.py --fast           # CI: fewer held-out documents
    python lessons/04-tiny-model/run.py --model weights/Qwen2.5-0.5B-Instruct --device cuda --dtype bfloat16

The measured effect: the loss of the pretrained model on freshly generated tiny-world text,
against the same architecture with random weights, and what each one writes.
"""
import argparse
import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

import minitune
from minitune.classroom.claims import claim, finish_claims
from minitune.classroom.lesson import finish, section
from minitune.memory import count_parameters, estimate_memory, human_bytes
from minitune.model import ModelConfig, Transformer
from minitune.tiny import corpus
from minitune.tiny.evaluate import ask

# A LLaMA-style ~1B configuration (the shape of TinyLlama-1.1B), for the "1B params = 4 GB" rule.
ONE_B = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4, model_type="llama")


def parse_args():
    p = argparse.ArgumentParser(description="Lesson 04: the tiny model")
    p.add_argument("--model", default="weights/tiny")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--fast", action="store_true", help="CI mode: fewer documents (< 60 s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 for models under 50M parameters, whose small matrices "
                        "gain nothing from a second thread; else torch's default)")
    p.add_argument("--seed", type=int, default=0, help="torch's seed: the random-init model of section 4 (default 0)")
    return p.parse_args()


def architecture(model, name: str):
    """Section 1: config.json's fields, and the parameters by kind."""
    section(f"1. the model: the architecture of {name} (Qwen2 layout)")
    cfg = model.config
    print(f"{'field (config.json)':28} value")
    for k in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "tie_word_embeddings",
              "qkv_bias", "torch_dtype"):
        print(f"{k:28} {getattr(cfg, k)}")
    # Parameters by kind, from the module tree (the tied lm_head shares the embedding, counted once).
    groups = {"embedding (tied with lm_head)": 0, "attention q/k/v/o (+ q/k/v bias)": 0, "MLP gate/up/down": 0,
              "RMSNorm weights": 0}
    for name, p in model.named_parameters():
        key = ("embedding (tied with lm_head)" if "embed" in name or "lm_head" in name else
               "attention q/k/v/o (+ q/k/v bias)" if "self_attn" in name else
               "MLP gate/up/down" if "mlp" in name else "RMSNorm weights")
        groups[key] += p.numel()
    total = model.num_parameters()
    print(f"\n{'parameters':34} {'count':>12} {'share':>7}")
    for k, n in groups.items():
        print(f"{k:34} {n:>12,} {n / total:>7.1%}")
    print(f"{'total':34} {total:>12,}   (minitune.memory.count_parameters from config: {count_parameters(cfg):,})")


def memory_math(model):
    """Section 2: bytes per parameter by dtype, and estimate_memory for full fine-tuning."""
    section("2. memory math (显存估算): weights, gradients, AdamW states, activations")
    n1b = count_parameters(ONE_B)
    print(f"{'dtype':10} {'bytes/param':>11} {'tiny model':>12} {f'{n1b / 1e9:.2f}B model':>12}")
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        b = torch.tensor([], dtype=dt).element_size()
        print(f"{str(dt).replace('torch.', ''):10} {b:>11} {human_bytes(b * model.num_parameters()):>12} "
              f"{human_bytes(b * n1b):>12}")
    print(f"\nfull fine-tuning of the {n1b / 1e9:.2f}B model with AdamW, batch 1 x 1024 tokens:")
    print(estimate_memory(ONE_B, "full", torch.bfloat16, batch_size=1, seq_len=1024))
    print(f"\nand of the tiny model, batch 4 x 128 (how it was pretrained):")
    print(estimate_memory(model.config, "full", torch.float32, batch_size=4, seq_len=128))


def number_formats():
    """Section 3: what fp32, bf16 and fp16 can hold, and what a few values become in each."""
    section("3. bf16 vs fp16 (数值格式)")
    print(f"{'dtype':9} {'bits: sign/exp/mantissa':>24} {'max':>11} {'smallest normal':>16} {'eps (1 -> next)':>16}")
    for dt, bits in ((torch.float32, "1 / 8 / 23"), (torch.bfloat16, "1 / 8 / 7"), (torch.float16, "1 / 5 / 10")):
        fi = torch.finfo(dt)
        print(f"{str(dt).replace('torch.', ''):9} {bits:>24} {fi.max:>11.4g} {fi.tiny:>16.4g} {fi.eps:>16.4g}")
    x = torch.tensor([70000.0, 1e-6, 1e-9, 1 + 1 / 512, 3.14159265])
    print(f"\n{'value in fp32':>14} {'-> bf16':>12} {'-> fp16':>12}")
    for v, b, h in zip(x.tolist(), x.bfloat16().float().tolist(), x.half().float().tolist()):
        print(f"{v:>14.8g} {b:>12.8g} {h:>12.8g}")
    print("fp16 overflows at 65504 and flushes tiny values (gradients!) to zero, hence the loss scaler;"
          "\nbf16 keeps fp32's range but only ~3 significant digits.")


@torch.no_grad()
def text_loss(model, tok, docs, device, dtype) -> float:
    """Mean next-token loss (nats per token) over documents, each scored on its own."""
    total, count = 0.0, 0
    eot = tok.token_to_id("<|endoftext|>")
    for d in docs:
        ids = torch.tensor([tok.encode(d)[:255] + ([eot] if eot is not None else [])], device=device)
        with torch.autocast(device.type if isinstance(device, torch.device) else device, dtype=torch.bfloat16,
                            enabled=dtype == "bfloat16"):
            logits = model(ids)[:, :-1].float()
        total += float(F.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


@torch.no_grad()
def complete(model, tok, prompt, n=16):
    ids = torch.tensor([tok.encode(prompt)], device=next(model.parameters()).device)
    stops = [i for i in (tok.token_to_id("<|endoftext|>"), tok.eos_id) if i is not None]
    out = minitune.generate(model, ids, n, eos_id=stops)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).split("\n")[0]


def pretraining_record(model_path: str) -> None:
    """The build's own record (build_info.json): the command, steps, tokens, loss and raw-text knowledge."""
    info_file = Path(model_path) / "build_info.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        print(f"command: {info['command']}\n{info['steps']} steps, {info['tokens_seen']:,} tokens seen "
              f"({info['tokens_seen'] / info['corpus_tokens']:.2f} epochs of a {info['corpus_tokens']:,}-token corpus), "
              f"loss {info['loss_first10']} -> {info['loss_last10']}, {info['pretrain_seconds']:.0f} s of training")
        print("raw-text knowledge at build time: " + ", ".join(f"{k}: {v:.0%}" for k, v in info["raw_knowledge"].items()))
    else:
        print(f"(no build_info.json in {model_path}: not a tiny-world build)")


def what_pretraining_taught(model, tok, args):
    """Section 4: the build's record, then the loss on freshly generated documents (a seed the model never
    saw) against the same architecture with random weights. Returns that random model for section 5."""
    section("4. what pretraining (预训练) taught it: the build's record, and the loss on unseen text")
    pretraining_record(args.model)
    n_docs = 12 if args.fast else 300
    docs = corpus.pretraining_corpus(n_docs=n_docs, seed=2024)[:n_docs]
    random_model = Transformer(model.config).to(args.device).eval()  # same shape, random init
    device = torch.device(args.device)
    trained, untrained = (text_loss(m, tok, docs, device, args.dtype) for m in (model, random_model))
    print(f"\nloss on {len(docs)} unseen tiny-world documents (nats/token): random init {untrained:.3f} "
          f"(ln vocab = {math.log(model.config.vocab_size):.3f}), pretrained {trained:.3f} "
          f"-> perplexity {math.exp(untrained):.0f} vs {math.exp(trained):.2f}")
    # pretraining is done before the lesson starts, so these hold in --fast mode too (fewer documents)
    ln_vocab = math.log(model.config.vocab_size)
    claim("a random-init model is as unsure as a uniform guess: its loss is within 1 nat of ln(vocab)",
          abs(untrained - ln_vocab) < 1.0, f"{untrained:.3f} vs ln(vocab) {ln_vocab:.3f}")
    claim("pretraining cut the loss on unseen tiny-world text to under a third of random init's",
          trained < untrained / 3, f"{trained:.3f} vs {untrained:.3f} nats/token")
    return random_model


def what_it_writes(model, random_model, tok, fast: bool) -> None:
    """Section 5: greedy continuations of raw text, then the same questions in ChatML, which it never saw."""
    section("5. what it writes: raw text (greedy), and the same questions in a chat template")
    rng = random.Random(0)
    country = rng.choice(list(corpus.CAPITALS))
    prompts = [f"The capital of {country} is", "3+4=", "7 plus 5 is", "The cow says", "cat sun ship reversed is",
               "Once upon a time,", "Question: Who are you?\nAnswer:", "法国的首都是"]
    for p in prompts[:4] if fast else prompts:
        print(f"  {p!r:40} -> pretrained {complete(model, tok, p)!r}")
        if not fast:
            print(f"  {'':40}    random     {complete(random_model, tok, p)!r}")
    print("\nbut in a chat template it has never seen (ChatML), asked the same things:")
    questions = [f"What is the capital of {country}?", "What is 3+4?", "Who are you?"]
    for q, r in zip(questions, ask(model, tok, questions, "chatml", max_new_tokens=20)):
        print(f"  {q!r:40} -> {r!r}")


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    model, tok = minitune.load_pretrained(args.model, device=args.device, dtype=torch.float32)
    if args.device == "cpu" and (args.threads or model.num_parameters() < 50e6):
        torch.set_num_threads(args.threads or 1)
    architecture(model, args.model)
    memory_math(model)
    number_formats()
    random_model = what_pretraining_taught(model, tok, args)
    what_it_writes(model, random_model, tok, args.fast)
    finish("04")
    finish_claims(args.fast, args.model)


if __name__ == "__main__":
    main()
