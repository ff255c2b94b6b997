"""Conversations to input_ids / labels: the loss mask, truncation, splits, padding, packing."""
import json
import re

import pytest
import torch

from minitune.data.dataset import (IGNORE_INDEX, PaddingCollator, PreferenceCollator, encode_segments, pack,
                                   prepare_sft, show_loss_mask, split_train_val, tokenize_all,
                                   tokenize_conversation, tokenize_preference)
from minitune.data.preference import PreferenceExample
from minitune.data.templates import render, render_segments


class ByteTokenizer:
    """Stub tokenizer: one id per UTF-8 byte (0-255), special tokens from 256 matched in the text first."""

    SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]

    def __init__(self, bos=True, pad=True):
        self.special = {t: 256 + i for i, t in enumerate(self.SPECIALS)}
        self.by_id = {i: t for t, i in self.special.items()}
        self.split = re.compile("(" + "|".join(map(re.escape, self.SPECIALS)) + ")")
        self.eos_id = self.special["<|endoftext|>"]
        self.bos_id = self.special["<|begin_of_text|>"] if bos else None
        self.pad_id = 0 if pad else None

    def encode(self, text):
        ids = []
        for piece in self.split.split(text):
            ids += [self.special[piece]] if piece in self.special else list(piece.encode())
        return ids

    def decode(self, ids):
        out, buf = [], bytearray()
        for i in ids:
            if i in self.by_id:
                out.append(buf.decode(errors="replace") + self.by_id[i])
                buf = bytearray()
            else:
                buf.append(i)
        return "".join(out) + buf.decode(errors="replace")


TOK = ByteTokenizer()


def m(role, content):
    return {"role": role, "content": content}


THREE_TURNS = [m("system", "Be brief."), m("user", "Capital of France?"), m("assistant", "Paris"),
               m("user", "Sure?"), m("assistant", "Yes."), m("user", "3+4?"), m("assistant", "7")]


def test_loss_mask_of_a_three_turn_dialogue_token_by_token(capsys):
    feat = tokenize_conversation(TOK, "qwen", THREE_TURNS)
    table = show_loss_mask(TOK, feat)
    assert capsys.readouterr().out.strip() == table.strip()
    rows = table.splitlines()[1:-1]  # "pos id mark 'token'" for every token
    assert len(rows) == len(feat["input_ids"])
    tokens = [eval(row.split(maxsplit=3)[3]) for row in rows]  # the repr'd token text
    trained = ["✓" in row for row in rows]

    # Exactly three runs of trained tokens: each assistant reply plus its <|im_end|>.
    runs, start = [], None
    for i, t in enumerate(trained + [False]):
        if t and start is None:
            start = i
        if not t and start is not None:
            runs.append((start, i))
            start = None
    assert ["".join(tokens[a:b]) for a, b in runs] == ["Paris<|im_end|>", "Yes.<|im_end|>", "7<|im_end|>"]
    for a, b in runs:  # each reply follows its assistant header; the newline after <|im_end|> is not trained
        assert "".join(tokens[:a]).endswith("<|im_start|>assistant\n")
        assert tokens[b:b + 1] == ["\n"]
    # Everything else (system prompt, user turns, role headers) is context only.
    untrained = "".join(tok for tok, t in zip(tokens, trained) if not t)
    assert untrained == render("qwen", THREE_TURNS).replace("Paris<|im_end|>", "").replace(
        "Yes.<|im_end|>", "").replace("7<|im_end|>", "")
    assert table.splitlines()[-1] == f"{sum(trained)} of {len(tokens)} tokens trained"
    # labels equal input_ids where trained, -100 elsewhere
    assert all(lab == (i if t else IGNORE_INDEX) for i, lab, t in zip(feat["input_ids"], feat["labels"], trained))


def test_llama3_dialogue_trains_replies_with_eot_and_starts_with_the_bos_id():
    feat = tokenize_conversation(TOK, "llama3", THREE_TURNS)
    assert feat["input_ids"][0] == TOK.bos_id and feat["labels"][0] == IGNORE_INDEX
    trained = [i for i, lab in zip(feat["input_ids"], feat["labels"]) if lab != IGNORE_INDEX]
    assert TOK.decode(trained) == "Paris<|eot_id|>Yes.<|eot_id|>7<|eot_id|>"
    assert TOK.decode(feat["input_ids"]) == render("llama3", THREE_TURNS)


def test_templates_without_end_string_learn_the_tokenizers_eos_id():
    feat = tokenize_conversation(TOK, "alpaca", THREE_TURNS[1:5])
    trained = [i for i, lab in zip(feat["input_ids"], feat["labels"]) if lab != IGNORE_INDEX]
    assert trained == TOK.encode("Paris") + [TOK.eos_id] + TOK.encode("Yes.") + [TOK.eos_id]
    assert feat["input_ids"][0] == TOK.bos_id  # BOS when the tokenizer has one ...
    no_bos = tokenize_conversation(ByteTokenizer(bos=False), "alpaca", THREE_TURNS[1:5])
    assert no_bos["input_ids"] == feat["input_ids"][1:]  # ... and nothing when it has none


def test_segments_encode_to_the_same_ids_as_the_whole_text():
    for name in ("qwen", "llama3.1", "chatml"):
        ids, _ = encode_segments(TOK, render_segments(name, THREE_TURNS))
        assert ids == TOK.encode(render(name, THREE_TURNS))


def test_truncation_drops_a_sample_left_without_trainable_tokens_and_counts_it():
    short = [m("user", "Hi"), m("assistant", "Hello")]
    long_prompt = [m("user", "x" * 200), m("assistant", "late reply")]
    cut_reply = [m("user", "Hi"), m("assistant", "y" * 200)]
    feats, report = tokenize_all([short, long_prompt, cut_reply], TOK, "chatml", cutoff_len=64)
    assert report.records == 3 and report.dropped_no_trainable == 1 and report.truncated == 1
    assert len(feats) == 2 and all(len(f["input_ids"]) <= 64 for f in feats)
    assert feats[1]["labels"][-1] != IGNORE_INDEX  # the cut reply keeps its first tokens to learn
    assert "1 truncated, 1 dropped with no trainable tokens left" in report.summary()
    _, report = tokenize_all([short, long_prompt], TOK, "chatml", cutoff_len=None)
    assert report.dropped_no_trainable == 0 and report.truncated == 0


def test_collator_pads_right_with_the_tokenizers_pad_id_and_masks_labels():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = PaddingCollator(ByteTokenizer())(batch)
    assert all(v.dtype == torch.long for v in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    no_pad = ByteTokenizer(pad=False)  # no pad token: EOS fills in, invisible behind the mask
    assert PaddingCollator(no_pad)(batch)["input_ids"][1].tolist() == [8, no_pad.eos_id, no_pad.eos_id]
    left = PaddingCollator(pad_id=9, side="left")(batch)
    assert left["input_ids"][1].tolist() == [9, 9, 8] and left["attention_mask"][1].tolist() == [0, 0, 1]


def test_packing_fills_fixed_blocks_and_keeps_each_tokens_label():
    feats, _ = tokenize_all([THREE_TURNS, THREE_TURNS[:3], THREE_TURNS[1:5]], TOK, "chatml")
    blocks = pack(feats, 32)
    assert all(len(b["input_ids"]) == 32 for b in blocks[:-1]) and 0 < len(blocks[-1]["input_ids"]) <= 32
    assert [t for b in blocks for t in b["input_ids"]] == [t for f in feats for t in f["input_ids"]]
    assert [t for b in blocks for t in b["labels"]] == [t for f in feats for t in f["labels"]]
    batch = PaddingCollator(TOK)(blocks)
    assert batch["input_ids"].shape == (len(blocks), 32)


def test_validation_split_is_reproducible_with_the_seed():
    items = list(range(100))
    train, val = split_train_val(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items and not set(train) & set(val)
    assert split_train_val(items, 0.1, seed=3) == (train, val)
    assert split_train_val(items, 0.1, seed=4)[1] != val
    assert len(split_train_val(items, 7, seed=3)[1]) == 7  # a count
    assert split_train_val(items, 0, seed=3) == (items, [])
    with pytest.raises(ValueError, match="leaves no training data"):
        split_train_val(items, 100)


def test_preference_pair_trains_only_on_each_response():
    ex = PreferenceExample([m("user", "2+2?")], chosen="4", rejected="five")
    feat = tokenize_preference(TOK, "qwen", ex)
    for side, reply in (("chosen", "4"), ("rejected", "five")):
        ids, labels = feat[f"{side}_input_ids"], feat[f"{side}_labels"]
        assert TOK.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == reply + "<|im_end|>"
    prompt_len = len(TOK.encode(render("qwen", ex.prompt, add_generation_prompt=True)))
    assert feat["chosen_input_ids"][:prompt_len] == feat["rejected_input_ids"][:prompt_len]
    assert tokenize_preference(TOK, "qwen", ex, cutoff_len=prompt_len) is None  # no response left
    batch = PreferenceCollator(TOK)([feat, feat])
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")}


def test_prepare_sft_from_a_file_reports_every_count(tmp_path):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    long = {"conversations": [{"from": "human", "value": "z" * 300}, {"from": "gpt", "value": "ok"}]}
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(good)] * 10 + ["{broken", json.dumps(long)]) + "\n")
    data = prepare_sft(path, TOK, "qwen", cutoff_len=128, val_size=0.2, seed=0, skip_bad=True)
    r = data.report
    assert (r.records, r.skipped_bad, r.dropped_no_trainable, r.train, r.val) == (11, 1, 1, 8, 2)
    packed = prepare_sft(path, TOK, "qwen", cutoff_len=128, val_size=0.2, seed=0, skip_bad=True, packing=True)
    assert packed.val == data.val and all(len(b["input_ids"]) <= 128 for b in packed.train)
    assert sum(len(b["input_ids"]) for b in packed.train) == sum(len(f["input_ids"]) for f in data.train)


def test_with_minitune_tokenizer_ids_equal_hf_chat_template_ids(tmp_path):
    """End to end with the project's own tokenizer: our ids for a rendered dialogue equal what
    transformers gets from the real Qwen2.5 chat_template with the same tokenizer files."""
    try:
        from minitune.tokenizer import load_tokenizer
        from minitune.tokenizer.bpe_trainer import train_bpe
    except ImportError as e:
        pytest.skip(f"minitune.tokenizer not importable yet ({e})")
    from test_templates import QWEN25_TEMPLATE
    from transformers import AutoTokenizer

    corpus = [render("qwen", THREE_TURNS), "The capital of France is Paris. 你好，世界！\n\n  indented code\n"] * 20
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    train_bpe(corpus, vocab_size=400, special_tokens=specials, eos_token="<|im_end|>",
              pad_token="<|endoftext|>").save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN25_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))

    dialogue = THREE_TURNS + [m("user", "Thanks!  Bye.\n"), m("assistant", " 再见 👋\n")]
    feat = tokenize_conversation(tok, "qwen", dialogue)
    hf_text = hf.apply_chat_template(dialogue, tokenize=False)
    assert feat["input_ids"] == hf.encode(hf_text, add_special_tokens=False) == tok.encode(hf_text)
    trained = [i for i, lab in zip(feat["input_ids"], feat["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "Paris<|im_end|>Yes.<|im_end|>7<|im_end|> 再见 👋\n<|im_end|>"
    assert PaddingCollator(tok).pad_id == tok.token_to_id("<|endoftext|>")
