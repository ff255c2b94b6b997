"""The tiny world: reproducible data, the scorers and the preference rule on hand cases,
the committed weights/tiny checkpoint, and lesson 05 in fast mode."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minitune
from minitune.data import load_examples, load_preferences
from minitune.tiny import corpus, tasks
from test_lesson_sections import assert_sections_printed  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "weights" / "tiny"


def test_corpus_is_reproducible_from_its_seed():
    a, b = corpus.pretraining_corpus(60, seed=7), corpus.pretraining_corpus(60, seed=7)
    assert a == b
    assert a != corpus.pretraining_corpus(60, seed=8)
    assert tasks.sft_records(5) == tasks.sft_records(5)
    assert tasks.eval_set(5) == tasks.eval_set(5)
    assert tasks.preference_pairs(5, n=50) == tasks.preference_pairs(5, n=50)


def test_corpus_states_every_sum_and_no_chat_markup():
    text = "\n".join(corpus.pretraining_corpus(100))
    for a in range(corpus.MAX_ADD + 1):
        for b in range(corpus.MAX_ADD + 1):
            assert f"{a}+{b}={a + b}" in text
    assert "<|im_start|>" not in text and "<|im_end|>" not in text  # SFT must teach the template ...
    assert "minitune" not in text.lower()  # ... and the new identity


def test_pretraining_dialogues_ask_every_phrasing_but_never_in_chatml():
    """Like web text, the corpus has seen every way of asking (the SFT data's and the evaluation's),
    in chat logs whose answers may be a word or a sentence; the held-out part of the evaluation is
    held out from the SFT data, and the chat template is new."""
    text = "\n".join(corpus.pretraining_corpus(800))
    assert "user: " in text and "\nassistant: " in text
    for task, (seen, held) in tasks.PROMPTS.items():
        for phrasing in seen + held:
            assert phrasing.split("{")[0] in text, (task, phrasing)


def test_evaluation_is_held_out_from_the_sft_data():
    train = tasks.sft_records()
    instructions = {r["instruction"] for r in train}
    rows = tasks.eval_set()
    for r in rows:
        if r["prompt"] not in tasks.IDENTITY_DEMO:  # the demo asks the training question on purpose
            assert r["prompt"] not in instructions, r
    train_phrasings = {p for task, (seen, _) in tasks.PROMPTS.items() for p in seen}
    assert not train_phrasings & {p for _, held in tasks.PROMPTS.values() for p in held}
    assert {r["task"] for r in rows} >= {"arithmetic", "reversal", "capital", "sound", "identity"}
    assert not any("sound" in r["instruction"] or " say?" in r["instruction"] for r in train)  # held-out task
    pairs = lambda text: tuple(int(x) for x in re.findall(r"\d+", text))  # noqa: E731
    sums_trained = {pairs(r["instruction"]) for r in train if r["output"].isdigit()}
    held_out = {pairs(r["prompt"]) for r in rows if r["task"] == "arithmetic"}
    assert held_out and not held_out & sums_trained


def test_exact_match_and_scores_on_hand_cases():
    assert tasks.exact_match("Paris", "Paris")
    assert tasks.exact_match(" paris. ", "Paris")
    assert tasks.exact_match("sun  dog cat", "sun dog cat")
    assert not tasks.exact_match("Paris is the capital", "Paris")
    assert not tasks.exact_match("19", "91")
    assert tasks.contains_answer("It is 19.", "19") and not tasks.contains_answer("It is 119.", "19")
    assert tasks.score("identity", "I am minitune-bot.", "minitune")
    assert tasks.score("identity", "我是 minitune 助手", "minitune")
    assert not tasks.score("identity", "I am a language model.", "minitune")


def test_preference_rule_on_hand_cases():
    p = "What is 3+4?"
    assert tasks.reference_answer(p) == "7"
    assert tasks.reference_answer("Reverse the words: cat dog sun") == "sun dog cat"
    assert tasks.reference_answer("Reverse the words: cat dog sun.") == "sun dog cat"  # punctuation is not a word
    assert tasks.reference_answer("Say these words from last to first: cat dog, please") == "dog cat"
    assert tasks.reference_answer("What is the capital of France?") == "Paris"
    s = tasks.preference_score
    assert s(p, "The answer is 7.") == 3.0
    assert s(p, "The answer is 7.") > s(p, "7") > s(p, "The answer is 8.") > s(p, "8")
    assert s(p, "Whatever. It is 7") < s(p, "7")  # rude costs a point
    assert s("你是谁?", "我是 minitune 助手。") == 1.0  # no reference answer: manners only
    for row in tasks.preference_pairs(n=200):
        assert s(row["prompt"], row["chosen"]) > s(row["prompt"], row["rejected"])


def test_data_files_read_with_minitune_readers():
    data = TINY / "data"
    alpaca, sharegpt = load_examples(data / "sft_alpaca.jsonl"), load_examples(data / "sft_sharegpt.jsonl")
    assert len(alpaca) == len(sharegpt) == len(tasks.sft_records())
    assert alpaca.examples == sharegpt.examples
    assert len(load_preferences(data / "preference.jsonl")) == len(tasks.preference_pairs())
    assert [json.loads(x) for x in (data / "eval.jsonl").read_text(encoding="utf-8").splitlines()] == tasks.eval_set()


def test_weights_load_and_tokenizer_round_trips():
    model, tok = minitune.load_pretrained(TINY)
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings and cfg.num_key_value_heads < cfg.num_attention_heads
    assert 1e6 < model.num_parameters() < 1e7
    assert next(model.parameters()).dtype == torch.bfloat16  # stored in bf16 (see lesson 04)
    assert sum(f.stat().st_size for f in TINY.rglob("*") if f.is_file()) < 10e6
    for text in ["The capital of France is Paris.", "12+7=19", "你是谁?我是 minitune 助手。",
                 "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"]:
        assert tok.decode(tok.encode(text)) == text
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tok.encode(special) == [tok.token_to_id(special)]
    assert tok.eos_id == tok.token_to_id("<|im_end|>") and tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert "<|im_start|>" in json.loads((TINY / "tokenizer_config.json").read_text())["chat_template"]
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.isfinite(model(ids).float()).all()


def test_lesson_05_fast_runs_and_prints_its_table(tmp_path):
    t = time.perf_counter()
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "lessons/05-sft/run.py", "--fast", "--out", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for line in ("before SFT", "after SFT", "identity demo", "all held-out questions", "loss picture"):
        assert line in out
    assert_sections_printed("05-sft", out)
    assert (tmp_path / "run" / "training_loss.png").exists()
    assert (tmp_path / "run" / "trainer_log.jsonl").exists()
    print(f"lesson 05 --fast: {time.perf_counter() - t:.0f} s")


def test_lesson_04_fast_runs_and_prints_the_memory_math_and_pretraining_effect():
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "lessons/04-tiny-model/run.py", "--fast"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4.4 GB in fp32, 2.2 GB in bf16" in proc.stdout  # the 1.1B-parameter example
    assert re.search(r"random init [\d.]+ .* pretrained [\d.]+", proc.stdout)
    assert_sections_printed("04-tiny-model", proc.stdout)
