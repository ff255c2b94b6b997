"""Lesson 01: tokenization. Read README.md beside this file; every number below is measured here.

    python lessons/01-tokenization/run.py [--model weights/tiny] [--fast]
"""
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import regex
import sentencepiece as spm

from minitune.classroom.claims import claim, finish_claims
from minitune.classroom.lesson import finish, parse_args, section, train_small_bpe
from minitune.data import TEMPLATES, encode_segments, get_template, render, show_loss_mask, tokenize_conversation
from minitune.tokenizer import load_tokenizer
from minitune.tokenizer.bpe import bytes_to_unicode
from minitune.tokenizer.bpe_trainer import LLAMA3_PATTERN, QWEN2_PATTERN, count_words
from minitune.tokenizer.pre_tokenizer import GPT2_PATTERN
from minitune.tokenizer.sample_text import mixed_text


def train_a_bpe(n_chars: int, vocab: int):
    """Section 1: train the BPE, show its first merges, replay them on one word. Returns (corpus, tokenizer)."""
    section(f"1. Training a byte-level BPE on {n_chars:,} characters of mixed text (vocab {vocab})")
    corpus = mixed_text(n_chars, seed=0)
    start = time.perf_counter()
    tok = train_small_bpe(n_chars, vocab)
    print(f"trained in {time.perf_counter() - start:.2f} s: 256 byte symbols + "
          f"{len(tok.backend.ranks)} merges + {len(tok.backend.added)} special tokens")
    words = count_words([corpus], QWEN2_PATTERN)
    print(f"the corpus splits into {sum(words.values()):,} pre-tokens, {len(words):,} distinct; most frequent:")
    print("   ", ", ".join(f"{w!r}x{c}" for w, c in words.most_common(8)))
    merges = sorted(tok.backend.ranks, key=tok.backend.ranks.get)
    print("first 12 merges (rank: left + right -> new symbol; Ġ is the space byte, Ċ the newline):")
    for r, (a, b) in enumerate(merges[:12]):
        print(f"   {r:>3}: {a!r:>8} + {b!r:<8} -> {a + b!r}")
    print("last 4 merges:", ", ".join(f"{a + b!r}" for a, b in merges[-4:]))
    print("merging ' training' step by step (lowest rank first):")
    trace(tok, " training")
    sentence = "Fine-tuning adapts a pretrained model: 12345 steps, 你好!"
    ids = tok.encode(sentence)
    print(f"{sentence!r} -> {len(ids)} tokens: {[readable(tok, i) for i in ids]}")
    assert tok.decode(ids) == sentence
    print("decode(encode(text)) == text: True")
    return corpus, tok


def trace(tok, word: str) -> None:
    """Apply the merges one at a time, as the BPE merge loop does, and print each step."""
    byte_char = bytes_to_unicode()
    parts = [byte_char[b] for b in word.encode("utf-8")]
    print(f"   {' '.join(parts)}")
    while True:
        ranked = [(tok.backend.ranks[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in tok.backend.ranks]
        if not ranked:
            break
        rank, i = min(ranked)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        print(f"   {' '.join(parts):<40} (merge rank {rank})")


def readable(tok, i: int) -> str:
    """A byte-level token as text, or as <hex bytes> when it is only part of a UTF-8 character."""
    raw = bytes(tok.backend.byte_decoder.get(c, 0) for c in tok.id_to_token(i))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "<" + raw.hex(" ") + ">"


def pre_tokenizer(model: str) -> None:
    """Section 2: the regex (the tiny model's, when it is there) beside GPT-2's and LLaMA-3's."""
    section("2. The pre-tokenizer regex: where a token may never cross")
    tiny_json = Path(model) / "tokenizer.json"
    pattern, source = QWEN2_PATTERN, "minitune/tokenizer/bpe_trainer.py (Qwen2's)"
    if tiny_json.is_file():
        pre = json.loads(tiny_json.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
        for p in pre.get("pretokenizers", [pre]):
            if p.get("type") == "Split" and "Regex" in p.get("pattern", {}):
                pattern, source = p["pattern"]["Regex"], str(tiny_json)
    print(f"pattern from {source}:\n    {pattern}")
    print("same as Qwen2's:", pattern == QWEN2_PATTERN)
    examples = {
        "code": "def f(x):\n    return x**2  # square",
        "numbers": "In 2024 we sold 1234567 units at $3.50",
        "Chinese": "大模型微调很有趣。我有3个apple",
        "contractions": "We'll see THEY'RE right, it's fine",
        "spaces": "a   b\n\n\tc",
    }
    for name, text in examples.items():
        print(f"\n{name}: {text!r}")
        for label, pat in (("GPT-2", GPT2_PATTERN), ("LLaMA-3", LLAMA3_PATTERN), ("Qwen2", pattern)):
            pieces = regex.findall(pat, text)
            print(f"   {label:8} {len(pieces):>2} pieces: {pieces}")


def sentencepiece_vs_bpe(corpus: str, tok, vocab: int) -> None:
    """Section 3: a SentencePiece BPE with byte fallback, trained on the same corpus to the same size.
    Returns, per sample text, whether both tokenizers decode it back exactly."""
    lossless = []
    section("3. SentencePiece (LLaMA-2 style, byte fallback) vs byte-level BPE, same corpus, same size")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.txt").write_text(corpus, encoding="utf-8")
        start = time.perf_counter()
        spm.SentencePieceTrainer.train(input=str(Path(tmp) / "corpus.txt"), model_prefix=str(Path(tmp) / "sp"),
                                       vocab_size=vocab, model_type="bpe", byte_fallback=True, character_coverage=0.98,
                                       split_digits=True, remove_extra_whitespaces=False, max_sentence_length=100_000,
                                       minloglevel=2, num_threads=2)
        print(f"sentencepiece trained in {time.perf_counter() - start:.2f} s")
        sp_tok = load_tokenizer(Path(tmp) / "sp.model")
    for text in ("Hello world, tokenizers split text.", "你好世界 😀", "    return x  # four spaces"):
        bpe_ids, sp_ids = tok.encode(text), sp_tok.encode(text)
        print(f"\n{text!r}")
        print(f"   byte-level BPE {len(bpe_ids):>2} tokens: {[tok.id_to_token(i) for i in bpe_ids]}")
        print(f"      (as text:  {[readable(tok, i) for i in bpe_ids]})")
        print(f"   sentencepiece  {len(sp_ids):>2} tokens: {[sp_tok.id_to_token(i) for i in sp_ids]}")
        print(f"   both decode back exactly: {tok.decode(bpe_ids) == text and sp_tok.decode(sp_ids) == text}")
        lossless.append(tok.decode(bpe_ids) == text and sp_tok.decode(sp_ids) == text)
    sample = mixed_text(5_000, seed=9)
    print(f"\nheld-out mixed text ({len(sample)} chars): byte-level {len(tok.encode(sample))} tokens, "
          f"sentencepiece {len(sp_tok.encode(sample))} tokens")
    return lossless


def chat_templates() -> None:
    """Section 4: one conversation rendered by each template, with the generation prompt appended."""
    section("4. Chat templates: one conversation, six layouts (ChatML, LLaMA-2, LLaMA-3, Alpaca, ChatGLM, Human/Assistant)")
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Japan?"}]
    for name in ("chatml", "llama2", "llama3", "alpaca", "chatglm", "human_assistant"):
        # ChatGLM-6B has no system role, so it gets the conversation without one
        text = TEMPLATES[name].render(messages[1:] if name == "chatglm" else messages, add_generation_prompt=True)
        print(f"--- {name} (generation prompt appended; stop at {TEMPLATES[name].stop!r})\n{text}")


def loss_mask(model: str, tok) -> None:
    """Section 5: which tokens of a two-turn dialogue SFT trains on (the tiny model's tokenizer, if there).
    Returns the trained tokens, decoded."""
    section("5. The loss mask: which tokens SFT trains on")
    model_tok = None
    if (Path(model) / "tokenizer.json").is_file() or (Path(model) / "tokenizer.model").is_file():
        model_tok = load_tokenizer(model)
        print(f"tokenizer: {model}")
    if model_tok is None or model_tok.token_to_id("<|im_start|>") is None:
        model_tok = tok
        print("tokenizer: the BPE trained in section 1 (it has the ChatML special tokens)")
    dialogue = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "Reverse: cat sun"}, {"role": "assistant", "content": "sun cat"}]
    feature = tokenize_conversation(model_tok, "chatml", dialogue)
    print(render("chatml", dialogue))
    show_loss_mask(model_tok, feature)
    counts = Counter(label != -100 for label in feature["labels"])
    print(f"labels: {counts[True]} trained (the replies and their <|im_end|>), {counts[False]} masked with -100")
    return model_tok.decode([t for t in feature["labels"] if t != -100])


# a tool call (function calling, 工具调用) in LLaMA-Factory's ShareGPT form: the tools column lists what the
# model may call; a function_call turn stands where a reply would, the tool's answer (observation) where a user turn would
# (the JSON columns are written out as the data file holds them)
TOOLS = ('[{"name": "get_weather", "description": "Current weather in a city", "parameters": {"type": "object", '
         '"properties": {"city": {"type": "string"}}, "required": ["city"]}}]')
TOOL_DIALOGUE = [
    {"role": "user", "content": "Weather in Paris?", "tools": TOOLS},
    {"role": "function_call", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
    {"role": "observation", "content": '{"temperature": 21, "sky": "clear"}'},
    {"role": "assistant", "content": "It is 21 degrees and clear in Paris."}]


def tool_call_mask(model: str, tok) -> dict:
    """Section 5, continued: the loss mask of a tool-call conversation in Qwen2.5's layout (template "qwen").
    The call trains like a reply (the model must learn to write it); the observation is the tool's text, context
    only. Returns the trained text and how many observation tokens train."""
    model_tok = load_tokenizer(model) if (Path(model) / "tokenizer.json").is_file() else None
    if model_tok is None or model_tok.token_to_id("<|im_start|>") is None:
        model_tok = tok  # the section 1 BPE: it has the ChatML special tokens
    segments = get_template("qwen").segments(TOOL_DIALOGUE)  # [(text, trainable)], tools listed in the system turn
    print("\na tool call (ShareGPT function_call / observation turns, a tools list), template 'qwen'; "
          "✓ trains, · is masked:")
    for text, trainable in segments:
        print("\n".join(f"  {'✓' if trainable else '·'} {line}" for line in text.split("\n")))
    feature = tokenize_conversation(model_tok, "qwen", TOOL_DIALOGUE)
    # walk the segments (each encoded on its own, as encode_segments does) to find the observation's labels
    pos, n_obs, obs_trained = 0, 0, 0
    for text, _ in segments:
        n = len(encode_segments(model_tok, [(text, False)])[0])
        if "<tool_response>" in text:  # the tool's answer, wrapped as Qwen2.5 wraps it
            n_obs += n
            obs_trained += sum(label != -100 for label in feature["labels"][pos:pos + n])
        pos += n
    trained = model_tok.decode([t for t in feature["labels"] if t != -100])
    print(f"labels: {sum(label != -100 for label in feature['labels'])} of {len(feature['labels'])} tokens trained "
          f"(the call and the reply, each with its <|im_end|>); observation-turn tokens trained: {obs_trained} of {n_obs}")
    return {"trained": trained, "obs_trained": obs_trained, "n_obs": n_obs}


def main():
    args = parse_args(__doc__)
    n_chars, vocab = (20_000, 800) if args.fast else (300_000, 1500)
    corpus, tok = train_a_bpe(n_chars, vocab)
    pre_tokenizer(args.model)
    lossless = sentencepiece_vs_bpe(corpus, tok, vocab)
    chat_templates()
    trained = loss_mask(args.model, tok)
    tools = tool_call_mask(args.model, tok)
    finish("01")

    # every claim here is about the code, not about training: all are checked in --fast mode too
    claim("byte-level BPE and SentencePiece (byte fallback) both decode every sample back exactly, "
          "Chinese and emoji included", all(lossless), f"{sum(lossless)}/{len(lossless)} samples round-trip")
    digits = {name: regex.findall(pat, "1234567")
              for name, pat in (("Qwen2", QWEN2_PATTERN), ("LLaMA-3", LLAMA3_PATTERN))}
    claim("Qwen2's regex cuts a number into single digits, LLaMA-3's into groups of up to three",
          digits["Qwen2"] == list("1234567") and digits["LLaMA-3"] == ["123", "456", "7"],
          f"'1234567' -> Qwen2 {digits['Qwen2']}, LLaMA-3 {digits['LLaMA-3']}")
    claim("the loss mask trains the two replies and their <|im_end|>, nothing of the questions",
          trained == "5<|im_end|>sun cat<|im_end|>", f"trained tokens decode to {trained!r}")
    call, reply = TOOL_DIALOGUE[1]["content"], TOOL_DIALOGUE[3]["content"]
    claim("in a tool-call conversation the call and the reply train, no observation token does",
          tools["obs_trained"] == 0 and tools["n_obs"] > 0
          and tools["trained"] == f"<tool_call>\n{call}\n</tool_call><|im_end|>{reply}<|im_end|>",
          f"observation-turn tokens trained: {tools['obs_trained']} of {tools['n_obs']}; trained tokens decode to "
          f"{tools['trained']!r}")
    finish_claims(args.fast)


if __name__ == "__main__":
    main()
