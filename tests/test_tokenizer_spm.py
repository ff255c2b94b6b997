"""SentencePiece (tokenizer.model, LLaMA-2 style BPE with byte fallback): parity with `sentencepiece`.

The model is trained here on a temporary corpus with the settings LLaMA-2's
model was trained with (BPE, byte_fallback, identity normalization, spaces kept).
"""
import pytest
import sentencepiece as spm

from minitune.tokenizer import SentencePieceModel, load_tokenizer
from minitune.tokenizer.sample_text import mixed_text

HELD_OUT = [
    "",
    "Hello world! It's a test; we'll see.",
    "大模型的后训练包括监督微调和对齐。你好,世界!",
    "emoji 😀🚀 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n    if x:\n        return [i**2 for i in range(x)]\n\treturn None\n",
    "runs of spaces:     here      and there  \n\n\n   ",
    " leading space",
    "tabs\t\tand\ttabs\t",
    "windows\r\nline\r\nendings\r\n",
    "digits 1234567890 3.14159 2024-05-06",
    "rare script ᚠᛇᚻ and ꙮ fall back to bytes",
    mixed_text(3000, seed=321),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text(mixed_text(200_000, seed=11), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=1500, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.99,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    corpus.unlink()
    return d


@pytest.fixture(scope="module")
def sp(model_dir):
    return spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


@pytest.mark.parametrize("text", HELD_OUT, ids=range(len(HELD_OUT)))
def test_encode_matches_sentencepiece(model_dir, sp, text):
    assert load_tokenizer(model_dir).encode(text) == sp.encode(text)


@pytest.mark.parametrize("text", HELD_OUT, ids=range(len(HELD_OUT)))
def test_decode_round_trips_exactly(model_dir, sp, text):
    tok = load_tokenizer(model_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == text


def test_an_id_beyond_the_vocabulary_decodes_to_nothing(model_dir, sp):
    # as bpe.py and HF's fast tokenizers do: a model's embedding may have rows the tokenizer lacks
    tok = load_tokenizer(model_dir)
    ids = tok.encode("hello world")
    assert tok.decode(ids[:1] + [tok.vocab_size + 7] + ids[1:]) == sp.decode(ids) == "hello world"


def test_bos_eos_come_from_the_model_when_no_config(model_dir, sp):
    tok = load_tokenizer(model_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), None) == (1, 2, None)
    assert tok.vocab_size == sp.get_piece_size() == 1500
    assert tok.token_to_id("</s>") == 2 and tok.token_to_id("no-such-piece") is None


def test_special_token_text_becomes_its_id_and_plain_text_is_encoded_around_it(model_dir, sp):
    tok = load_tokenizer(model_dir)
    assert tok.encode("Hi</s><s>there") == sp.encode("Hi") + [2, 1] + sp.encode("there")
    assert tok.decode(tok.encode("Hi</s>")) == "Hi</s>"
    assert tok.decode(tok.encode("Hi</s>"), skip_special_tokens=True) == "Hi"


def test_added_tokens_from_tokenizer_config_extend_the_vocab(model_dir, sp):
    backend = SentencePieceModel(model_dir / "tokenizer.model", added={"<|im_start|>": 1500, "<|im_end|>": 1501})
    assert backend.vocab_size == 1502
    assert backend.encode("<|im_start|>user<|im_end|>") == [1500] + sp.encode("user") + [1501]
    assert backend.decode([1500, 1501], skip_special_tokens=True) == ""


def test_autotokenizer_loads_saved_dir_with_same_ids(model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")  # transformers needs it to convert a .model file
    tok = load_tokenizer(model_dir)
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token_id == tok.eos_id and hf.bos_token_id == tok.bos_id
    # transformers' Metaspace skips the "▁" prefix when the text already starts with a space,
    # where sentencepiece adds it anyway; LLaMA-2 was trained with sentencepiece, so we follow
    # it and leave such texts out of the comparison.
    for text in [t for t in HELD_OUT if not t[:1].isspace()] + ["a<s>b</s>c"]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_missing_model_file_error_names_folder_and_expected_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*tokenizer\.model.*config\.json"):
        load_tokenizer(tmp_path)


def test_corrupt_model_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)
