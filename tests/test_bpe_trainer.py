"""Our BPE trainer: its tokenizer.json loads in HF `tokenizers` and encodes exactly like our encoder."""
import json
import time
from collections import Counter

import pytest

from minitune.tokenizer import load_tokenizer
from minitune.tokenizer.bpe import bytes_to_unicode
from minitune.tokenizer.bpe_trainer import LLAMA3_PATTERN, QWEN2_PATTERN, count_words, learn_merges, train_bpe
from minitune.tokenizer.sample_text import mixed_text

tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HELD_OUT = [
    "", "Hello, world! It's 2024.", "你好,世界!大模型微调。", "😀🚀 👨‍👩‍👧", "    indented\n\tcode\r\n",
    "x  y   z", "<|im_start|>user\nhi<|im_end|><|endoftext|>", "Zebra quokka xylophone (unseen words)",
    mixed_text(20_000, seed=2024),
]


def _corpus(n_chars=400_000, seed=1):
    text = mixed_text(n_chars, seed)
    return [text[i:i + 5000] for i in range(0, len(text), 5000)]


@pytest.fixture(scope="module", params=[("qwen2", QWEN2_PATTERN), ("llama3", LLAMA3_PATTERN)], ids=lambda p: p[0])
def trained(request, tmp_path_factory):
    tok = train_bpe(_corpus(), vocab_size=1000, special_tokens=SPECIALS, pattern=request.param[1],
                    eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    d = tmp_path_factory.mktemp(request.param[0])
    tok.save(d)
    return tok, d


@pytest.mark.parametrize("text", HELD_OUT, ids=range(len(HELD_OUT)))
def test_hf_tokenizers_loads_our_file_and_encodes_identically(trained, text):
    tok, d = trained
    hf = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert hf.decode(tok.encode(text), skip_special_tokens=False) == tok.decode(tok.encode(text)) == text


def test_reloaded_tokenizer_equals_the_trained_one(trained):
    tok, d = trained
    again = load_tokenizer(d)
    assert again.encode(HELD_OUT[-1]) == tok.encode(HELD_OUT[-1])
    assert again.eos_id == again.pad_id == tok.eos_id == again.token_to_id("<|endoftext|>")
    assert again.bos_id is None and again.vocab_size == tok.vocab_size


def test_vocab_is_bytes_then_merges_then_special_tokens(trained):
    tok, _ = trained
    spec = tok.backend.spec
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    assert [vocab[bytes_to_unicode()[b]] for b in range(256)] == list(range(256))
    assert tok.vocab_size <= 1000 and len(vocab) == tok.vocab_size - len(SPECIALS)
    assert [t["id"] for t in spec["added_tokens"]] == list(range(len(vocab), len(vocab) + 3))
    assert all(isinstance(m, list) and len(m) == 2 for m in merges)


def test_special_tokens_are_never_merged_into_words():
    counts = count_words(["a<|im_end|>b<|im_end|>"], QWEN2_PATTERN, SPECIALS)
    assert counts == Counter({"a": 1, "b": 1})


def test_incremental_counts_give_the_same_merges_as_recounting_each_step():
    counts = count_words(_corpus(20_000, seed=9) + ["aaaaaaa abababab aaaa aab baab"] * 5, QWEN2_PATTERN)
    _, fast = learn_merges(counts, 200)
    byte_char = bytes_to_unicode()
    words = {tuple(byte_char[b] for b in w.encode()): f for w, f in counts.items()}
    slow = []
    for _ in range(200):  # the textbook loop: recount all pairs, merge the most frequent
        pairs = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs or max(pairs.values()) < 2:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        slow.append(best)
        new = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += f
        words = new
    assert fast == slow


def test_training_a_few_mb_corpus_takes_seconds():
    corpus = _corpus(2_000_000, seed=4)
    start = time.perf_counter()
    tok = train_bpe(corpus, vocab_size=4000, special_tokens=SPECIALS)
    assert time.perf_counter() - start < 30
    assert tok.vocab_size > 1000


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="below the 256 byte symbols"):
        train_bpe(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="not one of special_tokens"):
        train_bpe(["abc"], vocab_size=300, special_tokens=["<s>"], eos_token="</s>")


def test_autotokenizer_loads_saved_dir_with_same_ids_and_eos(trained):
    transformers = pytest.importorskip("transformers")
    tok, d = trained
    hf = transformers.AutoTokenizer.from_pretrained(d)
    for text in HELD_OUT:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    assert json.loads((d / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
