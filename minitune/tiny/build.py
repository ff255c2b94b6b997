"""Build the tiny world's model from nothing: corpus -> BPE tokenizer -> Qwen2-layout model -> pretraining.

    python -m minitune.tiny.build --out weights/tiny        (what `make weights` runs)

Steps, each printed with its numbers:

1. generate the corpus and the task data (:mod:`minitune.tiny.corpus`, :mod:`minitune.tiny.tasks`);
2. train a byte-level BPE tokenizer on it with our own trainer (``minitune.tokenizer.bpe_trainer``),
   with Qwen's ChatML special tokens and a ChatML ``chat_template``;
3. build a small Qwen2-layout decoder (``TINY_CONFIG``) and pretrain it on the corpus with the
   same trainer lesson 05 uses for SFT (``minitune.train.train``): every token is a label;
4. save it with ``minitune.save_pretrained`` in bfloat16, plus the data files in ``<out>/data/``.

Fixed seeds throughout, so the same command on the same torch version rebuilds the same model.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

import torch

from ..data import get_template
from ..generation import generate
from ..model import ModelConfig, Transformer, save_pretrained
from ..tokenizer.bpe_trainer import train_bpe
from ..train import TrainConfig, train
from ..train.trainer import causal_lm_loss
from . import corpus, tasks

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen's order
# The jinja template transformers' apply_chat_template runs; minitune.data's "chatml" renders the same text.
CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
                " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")
VOCAB_SIZE = 2048


def tiny_config(vocab_size: int) -> ModelConfig:
    """About 2 M parameters: big enough to memorise the world, small enough to pretrain on 2 CPU cores."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, model_type="qwen2",
                       max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)


def build_tokenizer(docs: list[str], sft_rows: list[dict]):
    # The SFT text is included so "minitune" and the Chinese identity get tokens of their own, as a
    # real tokenizer's training data covers the text it will later be fine-tuned on.
    # Rendered in ChatML, so the role names ("user", "assistant") become tokens too.
    chatml = get_template("chatml")
    texts = docs + [chatml.render([{"role": "user", "content": r["instruction"]},
                                   {"role": "assistant", "content": r["output"]}]) for r in sft_rows]
    tok = train_bpe(texts, VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, eos_token="<|im_end|>",
                    pad_token="<|endoftext|>")
    tok.chat_template = CHATML_JINJA
    return tok


def pack_blocks(docs: list[str], tok, block_size: int) -> list[dict]:
    """Documents joined by <|endoftext|> and cut into full blocks; labels = inputs (raw pretraining)."""
    eot = tok.token_to_id("<|endoftext|>")
    ids = []
    for d in docs:
        ids += tok.encode(d) + [eot]
    n = len(ids) // block_size
    return [{"input_ids": ids[i * block_size:(i + 1) * block_size],
             "labels": ids[i * block_size:(i + 1) * block_size]} for i in range(n)]


@torch.no_grad()
def complete(model, tok, prompt: str, max_new_tokens: int = 12) -> str:
    """Greedy raw-text continuation (no chat template), stopping at the end of the line."""
    ids = torch.tensor([tok.encode(prompt)])
    out = generate(model, ids, max_new_tokens, eos_id=[tok.token_to_id(t) for t in SPECIAL_TOKENS])
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).split("\n")[0]


def raw_knowledge(model, tok) -> dict:
    """What the pretrained model knows in raw-text form: accuracy of greedy continuations."""
    a_b = [(a, b) for a in range(0, corpus.MAX_ADD + 1, 2) for b in range(0, corpus.MAX_ADD + 1, 3)]
    checks = {
        "sums 'a+b='": [(f"{a}+{b}=", str(a + b)) for a, b in a_b],
        "capitals 'The capital of X is'": [(f"The capital of {k} is", v) for k, v in corpus.CAPITALS.items()],
        "sounds 'The X says'": [(f"The {k} says", v) for k, v in corpus.SOUNDS.items()],
    }
    model.eval()
    return {name: sum(complete(model, tok, p).strip().rstrip(".").split(" ")[0] == a for p, a in rows) / len(rows)
            for name, rows in checks.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="weights/tiny", help="checkpoint folder to write (default weights/tiny)")
    p.add_argument("--steps", type=int, default=2500, help="pretraining optimizer steps (default 2500)")
    p.add_argument("--batch-size", type=int, default=4, help="blocks per step (default 4)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--docs", type=int, default=8000, help="corpus documents (default 8000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=corpus.SEED)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: this model's matrices are so small that a second thread "
                        "mostly waits on the first, and on a shared machine it is several times slower)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    out = Path(args.out)

    docs = corpus.pretraining_corpus(args.docs, args.seed)
    sft_rows = tasks.sft_records(args.seed)
    print(f"[1/4] corpus: {len(docs)} documents, {sum(map(len, docs)):,} characters; "
          f"SFT data: {len(sft_rows)} examples; eval: {len(tasks.eval_set(args.seed))} prompts")

    t = time.perf_counter()
    tok = build_tokenizer(docs, sft_rows)
    blocks = pack_blocks(docs, tok, args.block_size)
    n_tokens = len(blocks) * args.block_size
    print(f"[2/4] tokenizer: {tok.vocab_size} ids (BPE, specials {SPECIAL_TOKENS}); corpus = {n_tokens:,} tokens "
          f"in {len(blocks)} blocks of {args.block_size} ({time.perf_counter() - t:.0f} s)")

    cfg = tiny_config(tok.vocab_size)
    cfg.eos_token_id = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    cfg.pad_token_id = tok.pad_id
    model = Transformer(cfg)
    print(f"[3/4] model: Qwen2 layout, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads, MLP {cfg.intermediate_size}, "
          f"tied embeddings: {model.num_parameters():,} parameters")

    seen = args.steps * args.batch_size * args.block_size
    print(f"      pretraining {args.steps} steps x {args.batch_size} x {args.block_size} tokens = {seen:,} tokens "
          f"({seen / n_tokens:.2f} epochs of the corpus)")
    run_dir = Path("runs") / "tiny-pretrain"
    tcfg = TrainConfig(learning_rate=args.lr, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       lr_scheduler_type="cosine", warmup_ratio=0.05, weight_decay=0.1,
                       cutoff_len=args.block_size, logging_steps=10, save_steps=0, plot_loss=True,
                       output_dir=str(run_dir), overwrite_output_dir=True,  # a rebuild replaces the last log
                       seed=args.seed, device=args.device)
    # The committed weights were pretrained with the plain (unfused) loss. The fused one gives the same
    # loss to 1e-5, but 2500 steps grow that rounding into different weights: plain keeps the rebuild exact.
    result = train(model, blocks, tcfg, tokenizer=tok, loss_fn=partial(causal_lm_loss, fused=False))
    losses = list(result.losses.values())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"      loss {first:.3f} (first 10 steps) -> {last:.3f} (last 10), ln(vocab) = {math.log(tok.vocab_size):.2f}; "
          f"{result.runtime_s:.0f} s, {seen / result.runtime_s:,.0f} tokens/s; curve: {result.plot_path}")

    model = model.to("cpu").eval()
    knows = raw_knowledge(model, tok)
    print("      raw-text knowledge (greedy): " + ", ".join(f"{k}: {v:.0%}" for k, v in knows.items()))

    # bf16 on disk: half the bytes of fp32, the dtype real checkpoints ship in; lessons upcast on load.
    save_pretrained(model.to(torch.bfloat16), tok, out)
    data = out / "data"
    data.mkdir(exist_ok=True)
    write_jsonl(data / "sft_alpaca.jsonl", sft_rows)
    write_jsonl(data / "sft_sharegpt.jsonl", [tasks.to_sharegpt(r) for r in sft_rows])
    write_jsonl(data / "eval.jsonl", tasks.eval_set(args.seed))
    write_jsonl(data / "preference.jsonl", tasks.preference_pairs(args.seed))
    info = {"parameters": model.num_parameters(), "steps": args.steps, "tokens_seen": seen,
            "corpus_tokens": n_tokens, "loss_first10": round(first, 4), "loss_last10": round(last, 4),
            "raw_knowledge": {k: round(v, 4) for k, v in knows.items()},
            "pretrain_seconds": round(result.runtime_s, 1), "total_seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__, "seed": args.seed, "command": "python -m minitune.tiny.build --out " + str(out)}
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[4/4] saved {out} ({size / 1e6:.1f} MB, weights in bfloat16) in {time.perf_counter() - t0:.0f} s total")


def write_jsonl(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
