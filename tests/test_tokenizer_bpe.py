"""Byte-level BPE read from tokenizer.json: token-id parity with HF `tokenizers`.

The tokenizer.json files are trained here with HF's own BpeTrainer, using the
pre-tokenizer regexes exactly as Qwen2 and LLaMA-3 ship them, so the test needs
no download.
"""
import json

import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from minitune.tokenizer import load_tokenizer  # noqa: E402
from minitune.tokenizer.bpe import ByteLevelBPE, TokenizerFileError  # noqa: E402
from minitune.tokenizer.sample_text import mixed_text  # noqa: E402

# Copied from the "pre_tokenizer" of Qwen2/Qwen2.5 and Meta-Llama-3 tokenizer.json (they differ in \p{N}{1,3}).
QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

HELD_OUT = [
    "",
    "Hello world! It's a test; we'll see. THEY'RE HERE.",
    "大模型的后训练包括监督微调和对齐。你好,世界!",
    "emoji 😀🚀 family 👨‍👩‍👧 flag 🇫🇷 skin 👍🏾",
    "def f(x):\n    if x:\n        return [i**2 for i in range(x)]\n\treturn None\n",
    "runs of spaces:     here      and there  \n\n\n   ",
    "tabs\t\tand\ttabs\t",
    "windows\r\nline\r\nendings\r\n\r\n",
    "digits 1234567890 3.14159 2024-05-06 1,000,000 ٣٤٥",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n你好<|im_end|><|endoftext|>",
    "glued<|im_start|>special<|im_end|>tokens<|endoftext|>",
    "<|im_start|<|im_end|>| partial <|im_sta",
    "caf\u0065\u0301 vs café (NFC folds the combining accent)",
    " leading space and trailing space ",
    "\n",
    "   ",
    mixed_text(4000, seed=123),
]


def _train_hf(pattern: str, nfc: bool, ignore_merges: bool, corpus: list[str], vocab_size=700) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer = normalizers.NFC() if nfc else None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(SPECIALS)  # appended after the merges, as Qwen lays out its ids
    return tok


@pytest.fixture(scope="module")
def corpus():
    text = mixed_text(150_000, seed=7)
    return [text[i:i + 2000] for i in range(0, len(text), 2000)]


def _write(tmp_path, tok: Tokenizer, merge_form: str):
    spec = json.loads(tok.to_str())
    if merge_form == "string":  # the pre-0.20 form: "a b"
        spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    else:
        spec["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path


FAMILIES = {  # name: (regex, NFC normalizer, ignore_merges) as each family's file sets them
    "qwen2": (QWEN2_REGEX, True, False),
    "llama3": (LLAMA3_REGEX, False, True),
}


@pytest.fixture(scope="module", params=[(f, m) for f in FAMILIES for m in ("pair", "string")],
                ids=lambda p: f"{p[0]}-{p[1]}-merges")
def pair(request, corpus, tmp_path_factory):
    family, merge_form = request.param
    hf = _train_hf(*FAMILIES[family], corpus)
    path = _write(tmp_path_factory.mktemp(family), hf, merge_form)
    return Tokenizer.from_file(str(path)), ByteLevelBPE.from_file(path)


@pytest.mark.parametrize("text", HELD_OUT, ids=range(len(HELD_OUT)))
def test_encode_matches_hf_tokenizers_on_held_out_text(pair, text):
    hf, ours = pair
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", HELD_OUT, ids=range(len(HELD_OUT)))
def test_decode_round_trips_and_matches_hf(pair, text):
    hf, ours = pair
    ids = ours.encode(text)
    expected = hf.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids) == expected
    # NFC is the only thing that may change the text on the way through.
    import unicodedata
    assert ours.decode(ids) in (text, unicodedata.normalize("NFC", text))


def test_skip_special_tokens_drops_only_special_ids(pair):
    hf, ours = pair
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_special_token_strings_become_single_ids(pair):
    _, ours = pair
    ids = ours.encode("a<|im_end|>b")
    assert ours.token_to_id("<|im_end|>") in ids and len(ids) == 3


def test_invalid_utf8_decodes_with_replacement_char(pair):
    hf, ours = pair
    ids = ours.encode("😀")  # four bytes; dropping the last one leaves broken UTF-8
    broken = [ours.token_to_id(ours.byte_encoder[b]) for b in "😀".encode()[:3]]
    assert ours.decode(broken) == hf.decode(broken) and "\ufffd" in ours.decode(broken)
    assert ours.decode(ids) == "😀"


def test_merge_cache_makes_repeated_words_reuse_results(pair):
    _, ours = pair
    ours.cache.clear()
    ours.encode("the cat the cat the cat")
    assert set(ours.cache) == {"the", " cat", " the"}


def test_gpt2_style_bytelevel_with_use_regex(tmp_path, corpus):
    """A plain ByteLevel pre-tokenizer (use_regex=true) means GPT-2's built-in regex."""
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_special_tokens(["<|endoftext|>"])
    ours = ByteLevelBPE.from_file(_write(tmp_path, hf, "pair"))
    for text in HELD_OUT + ["x<|endoftext|>y", "<|endoftext|> z"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


def test_added_token_lstrip_rstrip_match_hf(tmp_path, corpus):
    from tokenizers import AddedToken
    hf = _train_hf(QWEN2_REGEX, True, False, corpus[:20], vocab_size=300)
    hf.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=True)])
    ours = ByteLevelBPE.from_file(_write(tmp_path, hf, "pair"))
    for text in ["a <mask> b", "a<mask>b", "  <mask>  ", "x\n<mask>\ny"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


# ---------------------------------------------------------------- bad input
def test_malformed_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="not valid JSON"):
        ByteLevelBPE.from_file(tmp_path / "tokenizer.json")


def test_missing_model_section_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="no 'model' section"):
        load_tokenizer(tmp_path)


def test_unsupported_normalizer_is_named_in_the_error(tmp_path, pair):
    hf, _ = pair
    spec = json.loads(hf.to_str())
    spec["normalizer"] = {"type": "Lowercase"}
    with pytest.raises(TokenizerFileError, match="Lowercase"):
        ByteLevelBPE(spec)


def test_merge_whose_result_is_missing_from_vocab_is_rejected(pair):
    hf, _ = pair
    spec = json.loads(hf.to_str())
    spec["model"]["merges"].append(["Q", "Z"])
    with pytest.raises(TokenizerFileError, match="not in the vocab"):
        ByteLevelBPE(spec)


def test_an_id_beyond_the_vocabulary_decodes_to_nothing_as_in_hf(pair):
    # a model's embedding may have more rows than the tokenizer has tokens (Qwen2.5: 151,936 vs 151,665)
    hf, ours = pair
    ids = [5, ours.vocab_size + 5, 6]
    assert ours.decode(ids) == hf.decode(ids) == ours.decode([5, 6])


@pytest.mark.parametrize("family,tokenizer_class", [("qwen2", "Qwen2Tokenizer"), ("llama3", "PreTrainedTokenizerFast")])
def test_autotokenizer_on_saved_dir_gives_same_ids(tmp_path, corpus, family, tokenizer_class):
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "src"
    src.mkdir()
    _write(src, _train_hf(*FAMILIES[family], corpus[:30], vocab_size=500), "pair")
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": tokenizer_class, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    tok = load_tokenizer(src)
    tok.save(tmp_path / "saved")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in HELD_OUT:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, tok.pad_id)


def test_regex_classes_agree_with_oniguruma_on_unicode_spaces_marks_and_digits(pair):
    """The `regex` package and HF's Oniguruma must agree on what \\s, \\p{L} and \\p{N} match."""
    import unicodedata
    hf, ours = pair
    chars = [chr(c) for c in range(0x3100) if unicodedata.category(chr(c))[0] in "ZCMN"
             and not 0xD800 <= c < 0xE000] + ["\u3000", "\ufeff", "\U0001F600"]
    for c in chars:
        text = f"a{c}b {c}{c}1{c}\n{c}x"
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, hex(ord(c))
