"""The command line: `python -m minitune {train,generate,chat} ...` (also installed as `minitune`).

    minitune train examples/sft.yaml --learning_rate 1e-4       # like `llamafactory-cli train x.yaml`
    minitune generate --model weights/tiny --template chatml --prompt "Who are you?"
    minitune chat --model saves/sft                              # like `llamafactory-cli chat`
"""

import argparse
import sys

import torch

from .train.config import FIELDS, TrainConfig, TrainConfigError, coerce, flag_help, load_config

IMPLEMENTED = {("sft", "full")}  # (stage, finetuning_type) pairs this version can train


# ----------------------------------------------------------------------------- train


def train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="fine-tune a model from a config file and/or flags", allow_abbrev=False,
                       description="Train with a LLaMA-Factory style config (.json or key: value .yaml); "
                                   "flags override the file. Boolean flags alone mean true (--bf16).")
    p.add_argument("config", nargs="?", help="config file (.json, or .yaml with flat key: value lines)")
    helps = flag_help()
    for name, f in FIELDS.items():
        bool_flag = f.type is bool
        p.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar="BOOL" if bool_flag else name.upper(),
                       nargs="?" if bool_flag else None, const="true" if bool_flag else None,
                       help=f"{helps.get(name, '')} (default: {f.default})")
    return p


def load_for_training(cfg: TrainConfig):
    """(model, tokenizer) ready to train: the finetuning_type hook (LoRA wraps the model here)."""
    import minitune

    if (cfg.stage, cfg.finetuning_type) not in IMPLEMENTED:
        raise SystemExit(f"error: stage {cfg.stage!r} with finetuning_type {cfg.finetuning_type!r} is not "
                         f"implemented yet; this version trains {sorted(IMPLEMENTED)}")
    if not cfg.model_name_or_path or not cfg.datasets or not cfg.output_dir:
        raise SystemExit("error: model_name_or_path, dataset and output_dir must be set (file or flags)")
    # full fine-tuning keeps fp32 weights (AdamW needs them); bf16/fp16 autocast the matmuls
    model, tok = minitune.load_pretrained(cfg.model_name_or_path, device="cpu", dtype=torch.float32)
    if tok is None:
        raise SystemExit(f"error: {cfg.model_name_or_path} has no tokenizer files")
    return model, tok


def run_train(cfg: TrainConfig):
    from .data import PaddingCollator, load_examples, prepare_sft
    from .train import distributed, train
    from .train.checkpoint import save_final

    model, tok = load_for_training(cfg)
    examples = [ex for path in cfg.datasets for ex in load_examples(path).examples]
    data = prepare_sft(examples, tok, cfg.template, cutoff_len=cfg.cutoff_len, val_size=cfg.val_size, seed=cfg.seed)
    main = distributed.is_main()
    if main:
        print(f"data: {data.report.summary()}")
    result = train(model, data.train, cfg, val_data=data.val or None, collate=PaddingCollator(tok), tokenizer=tok)
    if main:
        save_final(model, tok, cfg.output_dir)
        print(f"trained {result.global_step} steps in {result.runtime_s:.1f} s; model saved to {cfg.output_dir}"
              + (f"; loss curve {result.plot_path}" if result.plot_path else ""))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- generate / chat


def model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer)")
    p.add_argument("--adapter", help="adapter folder (e.g. LoRA) to put on the model")
    p.add_argument("--template", help="chat template name (see minitune.data.TEMPLATES); chat defaults to "
                                      "chatml, generate without one continues the raw prompt text")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max_new_tokens", type=int, default=256, help="most tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling")
    p.add_argument("--top_k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top_p", type=float, help="nucleus sampling: the smallest set with probability >= p")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's) | float32 | bfloat16 | float16")


def attach_adapter(model, adapter_dir):
    """Adapter hook: put the trained adapter in `adapter_dir` onto `model` and return the model.

    minitune.peft provides `load_adapter(model, path)`; until it exists, --adapter is refused.
    """
    try:
        from .peft import load_adapter
    except ImportError:
        raise SystemExit("error: --adapter needs minitune.peft.load_adapter, which this version lacks") from None
    return load_adapter(model, adapter_dir)


def load_for_inference(args):
    import minitune

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tok = minitune.load_pretrained(args.model, device=device, dtype=None if args.dtype == "auto" else args.dtype)
    if tok is None:
        raise SystemExit(f"error: {args.model} has no tokenizer files")
    if args.adapter:
        model = attach_adapter(model, args.adapter)
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


def reply(model, tok, device, args, messages: list[dict] | None, prompt: str | None, out=None) -> str:
    """Stream a continuation of a chat (messages + template) or of raw prompt text; returns the text."""
    from .data import encode_segments, get_template, render_segments

    out = out or sys.stdout
    stop, stop_ids = "", {tok.eos_id} - {None}
    if messages is not None:
        template = get_template(args.template)
        ids, _ = encode_segments(tok, render_segments(template, messages, add_generation_prompt=True))
        stop = template.stop
        stop_id = tok.token_to_id(stop) if stop else None
        if stop_id is not None:  # a single special token, e.g. <|im_end|>: generate stops on it
            stop_ids.add(stop_id)
            stop = ""
    else:
        ids = tok.encode(prompt)
    streamer = Streamer(tok, stop_ids, stop, out)
    try:
        import minitune

        minitune.generate(model, torch.tensor([ids], device=device), args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, eos_id=sorted(stop_ids), seed=args.seed, on_token=streamer)
        streamer.flush()
    except StopGeneration:
        pass
    out.write("\n")
    return streamer.text


def run_generate(args):
    model, tok, device = load_for_inference(args)
    messages = None
    if args.template:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
    reply(model, tok, device, args, messages, args.prompt)


def run_chat(args, stdin=None, out=None):
    """A terminal chat that keeps the history; /reset forgets it, /exit (or end of input) quits."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    args.template = args.template or "chatml"
    model, tok, device = load_for_inference(args)
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
        history.append({"role": "user", "content": text})
        out.write("Assistant: ")
        answer = reply(model, tok, device, args, system + history, None, out)
        history.append({"role": "assistant", "content": answer})


# ----------------------------------------------------------------------------- entry point


def main(argv=None):
    parser = argparse.ArgumentParser(prog="minitune", description="LLM post-training from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)
    tp = train_parser(sub)
    gp = sub.add_parser("generate", help="continue one prompt", description="Generate a reply to one prompt.")
    model_args(gp)
    gp.add_argument("--prompt", required=True, help="the prompt (a user message when --template is given)")
    cp = sub.add_parser("chat", help="interactive chat in the terminal",
                        description="Chat with a model: the reply streams token by token; the history is "
                                    "kept; /reset clears it, /exit quits. Reads stdin, so input can be piped.")
    model_args(cp)
    args, unknown = parser.parse_known_args(argv)
    if args.command != "train":
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return run_generate(args) if args.command == "generate" else run_chat(args)
    try:
        for flag in unknown:  # an unknown --flag: say which name was probably meant
            if flag.startswith("--") and flag[2:].split("=")[0] not in FIELDS:
                coerce(flag[2:].split("=")[0], None, f"command line ({flag})")
        if unknown:
            tp.error(f"unrecognized arguments: {' '.join(unknown)}")
        overrides = {k: v for k, v in vars(args).items() if k in FIELDS}
        cfg = load_config(args.config, overrides)
    except TrainConfigError as e:
        raise SystemExit(f"minitune train: error: {e}") from None
    run_train(cfg)
