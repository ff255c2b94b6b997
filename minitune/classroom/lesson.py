"""What the lessons' run.py scripts share: flags, loading the tiny model (or a stand-in), timing.

Every ``lessons/NN-*/run.py`` takes ``--model PATH`` (default ``weights/tiny``), ``--device``,
``--dtype``, ``--fast``, ``--seed`` and ``--threads``, and ends with its claims
(:mod:`minitune.classroom.claims`). When the model folder is missing (a fresh clone before the tiny
model is trained), :func:`load_or_build` says so and builds a small random Qwen2-shaped model
and a byte-level BPE trained on the spot, so the lesson still runs; its numbers then describe
that stand-in, and generated text is noise.
"""
from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import minitune
from minitune.data import PaddingCollator, prepare_sft
from minitune.memory import parameter_counts
from minitune.model import ModelConfig, Transformer
from minitune.tokenizer.bpe_trainer import train_bpe
from minitune.tokenizer.sample_text import mixed_text
from minitune.train import TrainConfig, train

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ChatML, as Qwen's tokenizer has them
ROOT = Path(__file__).resolve().parents[2]


def parse_args(description: str, argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=str(ROOT / "weights" / "tiny"),
                    help="a Hugging Face checkpoint folder (default: weights/tiny)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    ap.add_argument("--fast", action="store_true", help="smaller sizes, for CI (< 30 s)")
    ap.add_argument("--seed", type=int, default=0, help="torch's seed for what the lesson draws (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


_START = time.perf_counter()
_marks = [_START]


def section(title: str) -> None:
    """A numbered section header; also says how long the previous section took.

    ``title`` starts with the number of the README's heading it belongs to ("3. ..."): the README
    is the textbook and run.py its measurements, so the two number their parts alike
    (tests/test_lesson_sections.py checks it)."""
    now = time.perf_counter()
    if len(_marks) > 1:
        print(f"[section took {now - _marks[-1]:.1f} s]")
    _marks.append(now)
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def finish(lesson: str) -> None:
    """The last section's time and the lesson's, after imports (``lesson``: its number, "01".."13")."""
    now, threads = time.perf_counter(), torch.get_num_threads()
    print(f"[section took {now - _marks[-1]:.1f} s]\n\nlesson {lesson} finished in {now - _START:.1f} s "
          f"(after imports; torch has {threads} thread{'s' if threads != 1 else ''})")


def train_small_bpe(n_chars: int, vocab_size: int):
    """A byte-level BPE with ChatML special tokens, trained on mixed sample text (seconds)."""
    return train_bpe([mixed_text(n_chars, seed=0)], vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                     eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _temp_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="minitune-lesson-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def load_or_build(args, hidden: int = 128, layers: int = 4):
    """(model, tokenizer, checkpoint folder, is_stand_in).

    Loads ``args.model`` if it holds a config.json; otherwise writes a random Qwen2-shaped model
    and a freshly trained tokenizer into a temporary folder (with save_pretrained, so the lesson
    can still read a real safetensors file) and loads that.
    """

    path = Path(args.model)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if (path / "config.json").is_file():
        model, tok = minitune.load_pretrained(path, device=args.device, dtype=dtype)
        print(f"model: {path} ({model.num_parameters() / 1e6:.2f} M parameters, {next(model.parameters()).dtype})")
        return model, tok, path, False
    print(f"NOTE: {path} has no config.json (the tiny model is not there yet). Using a stand-in: a random\n"
          f"      Qwen2-shaped model and a byte-level BPE trained right now. Its text is noise.")
    tok = train_small_bpe(20_000, 512)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, model_type="qwen2",
                      tie_word_embeddings=True, max_position_embeddings=4096, torch_dtype="float32",
                      eos_token_id=tok.eos_id, rms_norm_eps=1e-6)
    model = Transformer(cfg)
    folder = _temp_dir() / "stand-in"
    minitune.save_pretrained(model, tok, folder)
    model, tok = minitune.load_pretrained(folder, device=args.device, dtype=dtype)
    print(f"stand-in model: {model.num_parameters() / 1e6:.2f} M parameters, written to {folder}")
    return model, tok, folder, True


def small_model_threads(args) -> None:
    """One torch thread on CPU for a checkpoint under 50 M parameters (or `args.threads` if given):
    such small matrices gain nothing from a second thread, and on a busy machine lose several times."""

    n_params = sum(parameter_counts(ModelConfig.from_file(Path(args.model) / "config.json")).values())
    if args.device == "cpu" and (args.threads or n_params < 50e6):
        torch.set_num_threads(args.threads or 1)


def timed(fn, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls, in seconds (the best is the least disturbed by other jobs).
    A GPU runs work queued by the CPU later, so with CUDA in use the clock waits for it on both sides."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    best = float("inf")
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def sft_start(args, steps: int):
    """(SFT model, tokenizer) that the alignment lessons (11 PPO, 12 DPO, 13 GRPO) start from:
    args.sft if given; else args.model SFT'd as in lesson 05 (shorter), cached in
    runs/rlhf-sft-<steps>/ and reused while the base model and the step count are the same."""

    if args.sft:
        print(f"SFT model: {args.sft} (--sft)")
        return minitune.load_pretrained(args.sft, device=args.device, dtype=torch.float32)
    base = Path(args.model)
    if not (base / "config.json").is_file() or not (base / "data").is_dir():
        sys.exit(f"this lesson needs the tiny world: {base} with config.json and data/ (build it with "
                 "python -m minitune.tiny.build --out weights/tiny)")
    weights = [[w.name, w.stat().st_size, w.stat().st_mtime] for w in sorted(base.glob("*.safetensors"))]
    key = {"model": str(base.resolve()), "steps": steps, "weights": weights}
    cache = Path(f"runs/rlhf-sft-{steps}")
    if (cache / "source.json").is_file() and json.loads((cache / "source.json").read_text()) == key:
        print(f"SFT model: {cache} (cached: {steps} SFT steps of {base}; delete the folder to redo)")
        return minitune.load_pretrained(cache, device=args.device, dtype=torch.float32)
    model, tok = minitune.load_pretrained(base, device=args.device, dtype=torch.float32)
    data = prepare_sft(base / "data" / "sft_alpaca.jsonl", tok, "chatml", cutoff_len=96, seed=0)
    cfg = TrainConfig(learning_rate=1e-3, max_steps=steps, per_device_train_batch_size=8, warmup_ratio=0.1,
                      logging_steps=steps, save_steps=0, seed=0, device=args.device)
    result = train(model, data.train, cfg, collate=PaddingCollator(tok), tokenizer=tok)
    losses = list(result.losses.values())
    print(f"SFT of {base}: {steps} steps, loss {losses[0]:.2f} -> {losses[-1]:.2f} ({result.runtime_s:.0f} s)")
    minitune.save_pretrained(model, tok, cache)
    (cache / "source.json").write_text(json.dumps(key))
    print(f"saved to {cache}; lessons 11 and 13 reuse it")
    return model, tok
