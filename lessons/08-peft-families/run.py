"""Lesson 08: the three families of parameter-efficient fine-tuning (参数高效微调) side by side.

    python lessons/08-peft-families/run.py            # full: lesson 05's SFT run with each method
    python lessons/08-peft-families/run.py --fast     # CI: a few steps each, a few questions

1. where each method puts its parameters, checked on the model: adapters (additive), prefix tuning,
   prompt tuning and P-tuning (soft prompts), a small LoRA (reparameterisation, lessons 06-07) with about
   the adapter's parameter count; and the chat tokens' rows of the embedding (trainable tokens), which any
   of them can train as well;
2. how many parameters: the tiny model (formula vs count) and LLaMA-7B (formula);
3. each method trained on lesson 05's data and schedule, evaluated the same way, beside full fine-tuning:
   with the chat-token rows (--rows on, the default), without (off), or both side by side;
4. the same questions answered by each.
"""
import shlex

import torch

from minitune.classroom import tiny_sft as S  # lesson 05's setup, shared by lessons 06-09
from minitune.classroom.claims import claim, finish_claims, not_checked
from minitune.memory import count_parameters as formula_total
from minitune.memory import lora_parameters
from minitune.model import ModelConfig
from minitune.peft import (PrefixTuningModel, PromptTuningModel, PTuningModel, adapter_num_params,
                           apply_adapters, apply_lora, apply_trainable_tokens, count_parameters, p_tuning_num_params,
                           prefix_tuning_num_params, prompt_tuning_num_params, token_ids, trainable_tokens_num_params)
from minitune.tiny.evaluate import ask

LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, model_type="llama")
N, BOTTLENECK, RANK = 20, 16, 4  # virtual tokens; adapter width; LoRA rank (55,296 weights, the adapter has 50,816)
EPOCHS_08 = S.PEFT_EPOCHS  # as lessons 06 and 07; lower it (--epochs) on a slow machine: five runs follow
# name -> (finetuning_type, its settings for `minitune train`, learning rate): each rate is the one with the lowest
# held-out loss in a short sweep on weights/tiny (README); soft prompts want far larger steps than weights do
METHODS = {"adapter": ("adapter", dict(adapter_bottleneck=BOTTLENECK, adapter_mode="serial"), 1e-2),
           "prefix": ("prefix", dict(num_virtual_tokens=N), 1e-1),
           "prompt": ("prompt", dict(num_virtual_tokens=N), 3e-1),
           "P-tuning": ("ptuning", dict(num_virtual_tokens=N, encoder_reparameterization_type="MLP",
                                        encoder_hidden_size=64), 1e-2),
           # the third family, at lesson 06's rate and alpha = 2r, on every linear layer of the blocks
           "LoRA": ("lora", dict(lora_rank=RANK, lora_alpha=2 * RANK, lora_target="all"), 2e-3)}
# the chat template's two tokens: pretraining never saw them, so their rows of the tied embedding / LM head are
# untrained (lesson 06). "NAME+rows" trains those two rows beside the method (`trainable_tokens`,
# minitune/peft/trainable_tokens.py), at the method's own rate: no other rate in the sweep got more answers right
CHAT_ROWS = "<|im_start|>,<|im_end|>"
ROWS = {f"{name}+rows": (ft, dict(settings, trainable_tokens=CHAT_ROWS), lr)
        for name, (ft, settings, lr) in METHODS.items()}


def extra_flags(p):
    p.add_argument("--methods", default=",".join(METHODS), help=f"which to train (default: {','.join(METHODS)})")
    p.add_argument("--rows", default="on", choices=["on", "off", "both"],
                   help=f"train the chat tokens' rows ({CHAT_ROWS}) beside each method: on (default), off (the "
                        "method alone), both (side by side: twice the runs)")


def runs_to_train(args) -> dict:
    """name -> (finetuning_type, settings, learning rate) of every run that --methods and --rows ask for."""
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: {unknown} not among {list(METHODS)}")
    runs = {}
    for n in names:  # a method and its +rows run side by side
        if args.rows in ("off", "both"):
            runs[n] = METHODS[n]
        if args.rows in ("on", "both"):
            runs[f"{n}+rows"] = ROWS[f"{n}+rows"]
    return runs


def at_init(diff: float) -> str:
    """What the largest logit change at init says: zero-initialised methods start at the base model
    (exactly on a CPU; a GPU's matmuls may round the LoRA layer's sum differently, ~1e-6)."""
    if diff == 0:
        return "equal the base model (zero-initialised up-projection or B)"
    if diff < 1e-3:
        return f"equal the base model up to rounding (largest change {diff:.0e}; zero-initialised up-projection or B)"
    return f"move by {diff:.2f} (the virtual tokens are random)"


def where_the_parameters_go(args, model, tok) -> dict:
    """Section 1: each method on a fresh copy of the model: which tensors train, and the logits at init.
    Returns the trainable parameters counted on each wrapped model, for section 2's table."""
    S.section("1. where the parameters go (three families, 三类方法)")
    ids = torch.tensor([tok.encode("The capital of Norway is")], device=args.device)
    with torch.no_grad():
        base_logits = model(ids)
    builders = {
        "adapter": lambda m: apply_adapters(m, BOTTLENECK, "serial"),
        "prefix": lambda m: PrefixTuningModel(m, N),
        "prompt": lambda m: PromptTuningModel(m, N),
        "P-tuning": lambda m: PTuningModel(m, N, "mlp", 64),
        "LoRA": lambda m: apply_lora(m, RANK, 2 * RANK, targets="all-linear"),
    }
    where = {"adapter": "a bottleneck MLP after attention and after the MLP of every block (additive)",
             "prefix": "n key/value vectors per layer, in the KV cache only (soft prompt, every layer)",
             "prompt": "n input embeddings in front of the prompt (soft prompt, input only)",
             "P-tuning": "n input embeddings made by a small MLP encoder (soft prompt, reparameterised)",
             "LoRA": f"a rank-{RANK} update B A beside every linear layer of the blocks (reparameterisation)"}
    counted = {}
    for name, build in builders.items():
        m, _ = S.load_lesson_model(args)
        wrapped = build(m)
        trainable = [(n, list(p.shape)) for n, p in wrapped.named_parameters() if p.requires_grad]
        counted[name] = count_parameters(wrapped)[0]
        with torch.no_grad():
            diff = (wrapped(ids) - base_logits).abs().max().item()
        print(f"{name:9} {where[name]}\n          trains {len(trainable)} tensors, e.g. {trainable[0][0]} {trainable[0][1]}; "
              f"at init the logits {at_init(diff)}")
    # beside any of them: the chat tokens' rows of the embedding, which the tied LM head shares
    m, _ = S.load_lesson_model(args)
    rows = apply_trainable_tokens(m.requires_grad_(False), token_ids(tok, CHAT_ROWS)).model.embed_tokens
    counted["+rows"] = count_parameters(m)[0]
    with torch.no_grad():
        diff = (m(ids) - base_logits).abs().max().item()
    print(f"{'+rows':9} rows {rows.token_indices.tolist()} ({CHAT_ROWS}) of embed_tokens, and so of the tied lm_head "
          f"({type(m.lm_head).__name__} scores with the same rows)\n          trains model.embed_tokens.delta "
          f"{list(rows.delta.shape)} beside the method; at init the logits "
          f"{'equal the base model (delta starts at zero)' if diff == 0 else f'move by {diff:.2f}'}")
    return counted


def how_many_parameters(cfg, counted: dict) -> None:
    """Section 2: each method's formula, checked against the count of section 1, and for LLaMA-7B."""
    S.section("2. how many parameters (参数量): tiny model (formula = count) and LLaMA-7B (formula)")
    rows = [("adapter, b=16, attn+mlp", adapter_num_params(cfg, BOTTLENECK), counted["adapter"],
             adapter_num_params(LLAMA_7B, BOTTLENECK)),
            ("adapter, b=64", adapter_num_params(cfg, 64), None, adapter_num_params(LLAMA_7B, 64)),
            (f"prefix, n={N}", prefix_tuning_num_params(cfg, N), counted["prefix"], prefix_tuning_num_params(LLAMA_7B, N)),
            (f"prefix, n={N}, MLP reparam.", prefix_tuning_num_params(cfg, N, True), None,
             prefix_tuning_num_params(LLAMA_7B, N, True)),
            (f"prompt tuning, n={N}", prompt_tuning_num_params(cfg, N), counted["prompt"],
             prompt_tuning_num_params(LLAMA_7B, N)),
            (f"P-tuning, n={N}, MLP h=64", p_tuning_num_params(cfg, N, "mlp", 64), counted["P-tuning"],
             p_tuning_num_params(LLAMA_7B, N, "mlp", 64)),
            (f"P-tuning, n={N}, MLP h=d", p_tuning_num_params(cfg, N, "mlp"), None, p_tuning_num_params(LLAMA_7B, N, "mlp")),
            (f"LoRA r={RANK}, all linear", lora_parameters(cfg, RANK), counted["LoRA"], lora_parameters(LLAMA_7B, RANK)),
            ("LoRA r=16, all linear (06)", lora_parameters(cfg, 16), None, lora_parameters(LLAMA_7B, 16)),
            ("+rows: 2 chat-token rows", trainable_tokens_num_params(cfg, 2), counted["+rows"],
             trainable_tokens_num_params(LLAMA_7B, 2))]
    total, total_7b = formula_total(cfg), formula_total(LLAMA_7B)
    print(f"{'method':30}{'tiny: formula':>14}{'counted':>10}{'% of model':>11}{'LLaMA-7B':>16}{'% of model':>11}")
    for label, tiny, cnt, big in rows:
        assert cnt is None or cnt == tiny, (label, cnt, tiny)
        print(f"{label:30}{tiny:>14,}{'' if cnt is None else format(cnt, ','):>10}{100 * tiny / total:>10.2f}%"
              f"{big:>16,}{100 * big / total_7b:>10.4f}%")
    checked = [(tiny, cnt) for _, tiny, cnt, _ in rows if cnt is not None]
    claim("each method's parameter formula equals the count on the wrapped tiny model",
          all(tiny == cnt for tiny, cnt in checked), f"{sum(t == c for t, c in checked)} of {len(checked)} methods")



def train_side_by_side(args, tok) -> dict:
    """Section 3: every run --methods and --rows ask for, on lesson 05's data and schedule, then the table
    beside full fine-tuning. Returns the runs (their models answer in section 4)."""
    S.section("3. each method on lesson 05's SFT run, beside full fine-tuning")
    data, questions = S.tiny_world(args, tok)
    print(f"SFT data: {data.report.summary()}; {len(questions)} held-out questions")
    full = S.full_baseline(args, data, questions, tok)
    runs = {}
    for name, (ft, settings, lr) in runs_to_train(args).items():
        lr = args.lr or lr
        flags = " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in settings.items())
        print(f"\n--- {name}: minitune train --finetuning_type {ft} {flags} --learning_rate {lr:g} "
              f"--num_train_epochs {args.epochs:g} ...")
        model, _ = S.load_lesson_model(args)
        out = str(S.ROOT / "runs" / f"lesson-08-{ft}{'-rows' if 'trainable_tokens' in settings else ''}")
        runs[name] = S.sft(model, tok, data, questions, S.config(args, ft, lr, out, **settings))
        print(f"{name}: {runs[name]['steps']} steps in {runs[name]['seconds']:.0f} s, "
              f"exact match {runs[name]['eval']['overall']:.1%}")
    print()
    S.print_runs({"full FT": full, **runs})
    print()
    for name, run in runs.items():
        S.verdict(name, run, full)
    families_claims(runs, full, args.fast)
    return runs


def families_claims(runs: dict, full: dict | None, fast: bool) -> None:
    """Section 3's findings for the runs made (names as runs_to_train gives them; the default is the +rows ones).
    Measured with seed 0 only (the README's table), so the margins are wide."""
    sfx = "+rows" if "LoRA+rows" in runs else ""
    lora, adapter = runs.get(f"LoRA{sfx}"), runs.get(f"adapter{sfx}")
    virtual = [runs[n] for n in (f"prefix{sfx}", f"prompt{sfx}", f"P-tuning{sfx}") if n in runs]
    texts = ["LoRA r=4 reaches full fine-tuning's held-out exact match (at most 5 points below it, or above)",
             "the adapter, with about as many parameters, falls at least 15 points short of LoRA r=4",
             "prefix, prompt and P-tuning get under 10% of the held-out questions at this size",
             "training the two chat-token rows (+rows) lets every method end a reply: -log P(<|im_end|>) below 0.5"]
    if fast or full is None:
        not_checked(texts)
        return
    if lora:
        a, b = lora["eval"]["overall"], full["eval"]["overall"]
        claim(texts[0], a >= b - 0.05, f"LoRA r=4 {a:.1%} vs full fine-tuning {b:.1%}")
    if lora and adapter:
        a, b = adapter["eval"]["overall"], lora["eval"]["overall"]
        claim(texts[1], a <= b - 0.15, f"adapter {a:.1%} vs LoRA r=4 {b:.1%}")
    if virtual:
        best = max(r["eval"]["overall"] for r in virtual)
        claim(texts[2], best < 0.10, f"the best of them {best:.1%}")
    rows = {n: r for n, r in runs.items() if n.endswith("+rows") and r["end_loss"] is not None}
    if rows:
        worst = max(r["end_loss"][0] for r in rows.values())
        claim(texts[3], worst < 0.5, f"the largest {worst:.2f}, over {len(rows)} runs")


def same_questions(args, tok, runs: dict) -> None:
    """Section 4: the same questions to every trained model; the last is a training example word for word."""
    S.section("4. the same questions, answered by each")
    # the last one is a training example word for word (its answer: green dog cake)
    demo = ["Who are you?", "What is the capital of Norway?", "How much is 3 plus 4?",
            "Reverse the words: cake dog green"][:1 if args.fast else 4]
    answers = {name: ask(run["model"], tok, demo, "chatml") for name, run in runs.items()}
    for i, q in enumerate(demo):
        print(f"{q!r}")
        for name in runs:
            print(f"  {name:13} -> {answers[name][i]!r}")


def main():
    # five runs (ten with --rows both), each with EPOCHS_08 epochs by default; --epochs trades accuracy for time
    args = S.parse_args("Lesson 08: adapters, prefix, prompt and P-tuning, and LoRA, side by side", lr=None,
                        extra=extra_flags, epochs=EPOCHS_08)
    model, tok = S.load_lesson_model(args)
    counted = where_the_parameters_go(args, model, tok)
    how_many_parameters(model.config, counted)
    runs = train_side_by_side(args, tok)
    same_questions(args, tok, runs)
    S.finish("08")
    finish_claims(args.fast, args.model)


if __name__ == "__main__":
    main()
