"""`minitune generate` and `minitune chat`: load a model (and adapter), stream replies token by token.

A chat keeps its history and sends all of it each turn, so a long conversation outgrows the
model's context (``max_position_embeddings``); :func:`fit_history` then drops the oldest
exchanges, as chat front ends do, and says so.
"""

import argparse
import dataclasses
import sys

import torch

import minitune

from .data import encode_segments, get_template, render_segments
from .data.templates import TEMPLATES, Template, ThinkingTemplate
from .errors import UserError
from .generation import GenerationError
from .peft import load_adapter


def model_args(p: argparse.ArgumentParser):
    p.add_argument("config", nargs="?", help="an inference config (.yaml/.json, as llamafactory-cli chat takes: "
                                             "model_name_or_path, adapter_name_or_path, template, ...); flags win")
    p.add_argument("--model", help="checkpoint folder (config.json, safetensors, tokenizer)")
    p.add_argument("--adapter", help="adapter folder (e.g. LoRA) to put on the model")
    p.add_argument("--template", help=f"chat template: {', '.join(TEMPLATES)}; chat defaults to chatml, "
                                      "generate without one continues the raw prompt text")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--enable_thinking", type=lambda v: v.lower() in ("true", "1", "yes"), metavar="BOOL",
                   help="qwen3 template: false answers without a reasoning block (default true)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="most tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling")
    p.add_argument("--top_k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top_p", type=float, help="nucleus sampling: the smallest set with probability >= p")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's) | float32 | bfloat16 | float16")


def chosen_template(args) -> Template:
    """--template by name; with --enable_thinking on a thinking layout (qwen3), that switch set."""
    template = get_template(args.template)
    if getattr(args, "enable_thinking", None) is not None and isinstance(template, ThinkingTemplate):
        template = dataclasses.replace(template, enable_thinking=args.enable_thinking)
    return template


def load_for_inference(args):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tok = minitune.load_pretrained(args.model, device=device, dtype=None if args.dtype == "auto" else args.dtype)
    if tok is None:
        raise UserError(f"{args.model}: no tokenizer files (tokenizer.json, or tokenizer.model)")
    if args.adapter:  # PEFT's LoRA / AdaLoRA folder, or minitune's method file (minitune/peft/adapter_io.py)
        try:
            model = load_adapter(model, args.adapter)
        except (ValueError, FileNotFoundError) as e:  # AdapterError is a ValueError
            raise UserError(f"--adapter {args.adapter}: {e}") from None
    return model.eval(), tok, device


class StopGeneration(Exception):
    pass


class Streamer:
    """generate's on_token callback: prints the reply as it grows and stops at a stop string.

    Text is printed only up to where it can no longer change: not a half-decoded UTF-8 character
    (U+FFFD at the end), not the start of what might become the stop string.
    """

    def __init__(self, tok, stop_ids: set[int], stop: str, out):
        self.tok, self.stop_ids, self.stop, self.out = tok, stop_ids, stop, out
        self.ids, self.shown, self.text = [], 0, ""

    def __call__(self, token: torch.Tensor):  # token: [1]
        t = int(token[0])
        if t in self.stop_ids:
            return  # generate ends on these ids itself
        self.ids.append(t)
        self.text = self.tok.decode(self.ids)
        if self.stop and self.stop in self.text:
            self.text = self.text[:self.text.index(self.stop)]
            self.flush()
            raise StopGeneration
        safe = len(self.text.rstrip("\ufffd")) - (len(self.stop) - 1 if self.stop else 0)
        if safe > self.shown:
            self.out.write(self.text[self.shown:safe])
            self.out.flush()
            self.shown = safe

    def flush(self):
        self.out.write(self.text[self.shown:])
        self.out.flush()
        self.shown = len(self.text)


def prompt_ids(tok, args, messages: list[dict] | None, prompt: str | None) -> list[int]:
    """The ids generation continues: a chat (messages + template) up to the assistant header, or raw text."""

    if messages is None:
        return tok.encode(prompt)
    return encode_segments(tok, render_segments(get_template(args.template), messages, add_generation_prompt=True))[0]


def reply(model, tok, device, args, messages: list[dict] | None, prompt: str | None, out=None) -> str:
    """Stream a continuation of a chat (messages + template) or of raw prompt text; returns the text."""

    out = out or sys.stdout
    stop, stop_ids = "", set(tok.stop_ids) or {tok.eos_id} - {None}  # the model's own stop set, as HF generate
    ids = prompt_ids(tok, args, messages, prompt)
    if messages is not None:
        stop = get_template(args.template).stop
        stop_id = tok.token_to_id(stop) if stop else None
        if stop_id is not None:  # a single special token, e.g. <|im_end|>: generate stops on it
            stop_ids.add(stop_id)
            stop = ""
    streamer = Streamer(tok, stop_ids, stop, out)
    try:

        minitune.generate(model, torch.tensor([ids], device=device), args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, eos_id=sorted(stop_ids), seed=args.seed, on_token=streamer)
        streamer.flush()
    except StopGeneration:
        pass
    out.write("\n")
    return streamer.text


def run_generate(args):
    if args.template:
        args.template = chosen_template(args)
    model, tok, device = load_for_inference(args)
    messages = None
    if args.template:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
    check_prompt_fits(model, len(prompt_ids(tok, args, messages, args.prompt)), args)
    reply(model, tok, device, args, messages, args.prompt)


def check_prompt_fits(model, n_prompt: int, args):
    """Refuse, as chat does, a prompt that leaves no room for --max_new_tokens in the model's context.

    Past the context the model sees positions it was never trained on and writes garbage without
    any error; the virtual tokens of prompt or prefix tuning (minitune.peft.prompt, .prefix) take
    positions too.
    """

    context, virtual = model.config.max_position_embeddings, getattr(model, "num_virtual_tokens", 0)
    n = n_prompt + virtual
    if n + args.max_new_tokens > context:
        with_virtual = f" with the adapter's {virtual} virtual tokens" if virtual else ""
        raise GenerationError(f"--prompt: it makes a {n}-token prompt{with_virtual}; the model's context is {context} "
                              f"tokens (max_position_embeddings in {args.model}/config.json) and --max_new_tokens "
                              f"{args.max_new_tokens} must fit too (shorten it or lower --max_new_tokens)")


def fit_history(tok, template: str, system: list[dict], history: list[dict], budget: int):
    """Drop the oldest (user, assistant) exchanges until the rendered prompt is at most `budget` tokens.

    Returns (kept history, exchanges dropped, prompt length). The newest user message is never
    dropped; if it alone is too long the caller must say so.
    """

    dropped = 0
    while True:
        ids, _ = encode_segments(tok, render_segments(template, system + history, add_generation_prompt=True))
        if len(ids) <= budget or len(history) <= 1:
            return history, dropped, len(ids)
        history, dropped = history[2:], dropped + 1  # history alternates user, assistant, ..., user


def run_chat(args, stdin=None, out=None):
    """A terminal chat that keeps the history; /reset forgets it, /exit (or end of input) quits."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    args.template = args.template or "chatml"
    args.template = chosen_template(args)
    model, tok, device = load_for_inference(args)
    context = model.config.max_position_embeddings
    budget = context - args.max_new_tokens  # the prompt must leave room for a whole reply
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    out.write("minitune chat: type a message; /reset clears the history, /exit quits.\n")
    while True:
        out.write("\nUser: ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            out.write("\n")
            return
        text = line.strip()
        if text == "/reset":
            history = []
            out.write("(history cleared)\n")
            continue
        if not text:
            continue
        message = {"role": "user", "content": text}
        n = fit_history(tok, args.template, system, [message], budget)[2]
        if n > budget:  # refuse before touching the history
            out.write(f"(not sent: this message makes a {n}-token prompt; the model's context is {context} tokens "
                      f"and --max_new_tokens {args.max_new_tokens} must fit too. Shorten it or lower --max_new_tokens.)\n")
            continue
        history, dropped, _ = fit_history(tok, args.template, system, history + [message], budget)
        if dropped:
            out.write(f"(dropped the {dropped} oldest exchange{'s' * (dropped > 1)} to fit the {context}-token context)\n")
        out.write("Assistant: ")
        answer = reply(model, tok, device, args, system + history, None, out)
        history.append({"role": "assistant", "content": answer})
