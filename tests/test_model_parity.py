"""minitune's transformer gives transformers' logits and greedy text, for every supported family,
in both config.json forms, single-file and sharded, fp32 and bf16; and its saves load back."""

import pytest
import torch
import transformers
from hf_factory import KINDS, hf_load, rel_error, write_checkpoint

import minitune

# (dtype, sharded, classic config form): each family is checked in all four corners
LAYOUTS = [(torch.float32, False, False), (torch.float32, True, True),
           (torch.bfloat16, False, True), (torch.bfloat16, True, False)]
REL_TOL = 1e-5  # the tolerance; fp32 and bf16 both come out bit-identical today


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,sharded,classic", LAYOUTS)
def test_logits_match_transformers(tmp_path, kind, dtype, sharded, classic):
    write_checkpoint(kind, tmp_path, dtype=dtype, sharded=sharded, classic=classic)
    if sharded:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours, tok = minitune.load_pretrained(tmp_path)
    ref = hf_load(tmp_path)
    assert tok is None and ours.lm_head.weight.dtype == dtype == ref.dtype
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_error(ours(ids), ref(ids).logits) < REL_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_32_tokens_identical_to_transformers_generate(tmp_path, kind):
    write_checkpoint(kind, tmp_path)
    ours, _ = minitune.load_pretrained(tmp_path)
    ref = hf_load(tmp_path)
    prompt = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(2))
    expected = ref.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = minitune.generate(ours, prompt, max_new_tokens=32)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_left_padded_batch_generates_like_transformers(tmp_path, kind):
    write_checkpoint(kind, tmp_path)
    ours, _ = minitune.load_pretrained(tmp_path)
    ref = hf_load(tmp_path)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 320, (n,), generator=g) for n in (9, 4, 13)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    got = minitune.generate(ours, ids, max_new_tokens=20, attention_mask=mask)
    assert got.tolist() == expected.tolist()
    # padding must not change a row's continuation: row 2 alone gives the same tokens
    alone = minitune.generate(ours, rows[1][None], max_new_tokens=20)
    assert alone[0, len(rows[1]):].tolist() == got[1, T:].tolist()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minitune_save_loads_into_transformers_with_same_logits(tmp_path, kind, dtype):
    write_checkpoint(kind, tmp_path / "src", dtype=dtype)
    ours, _ = minitune.load_pretrained(tmp_path / "src")
    minitune.save_pretrained(ours, None, tmp_path / "out", max_shard_size=100_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()  # sharded past the limit
    ref = hf_load(tmp_path / "out")
    again, _ = minitune.load_pretrained(tmp_path / "out")
    ids = torch.randint(0, 320, (1, 30))
    with torch.no_grad():
        assert ref.dtype == dtype
        assert rel_error(ref(ids).logits, ours(ids)) < REL_TOL
        assert torch.equal(again(ids), ours(ids))


def test_load_casts_to_requested_dtype(tmp_path):
    write_checkpoint("qwen2", tmp_path, dtype=torch.bfloat16)
    model, _ = minitune.load_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.torch_dtype == "float32"
    ref = hf_load(tmp_path).float()
    ids = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        assert rel_error(model(ids), ref(ids).logits) < REL_TOL


def test_load_pretrained_returns_the_tokenizer_and_save_writes_it_back(tmp_path):
    from minitune.tokenizer.bpe_trainer import train_bpe

    write_checkpoint("qwen2", tmp_path / "src")
    corpus = ["hello world, this is minitune.", "你好，世界", "def f(x):\n    return x + 1"] * 20
    train_bpe(corpus, vocab_size=300, special_tokens=["<|endoftext|>"], eos_token="<|endoftext|>").save(tmp_path / "src")
    model, tok = minitune.load_pretrained(tmp_path / "src")
    assert tok is not None and tok.eos_id == tok.token_to_id("<|endoftext|>")
    minitune.save_pretrained(model, tok, tmp_path / "out")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "hello 世界<|endoftext|> return x"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    ids = torch.tensor([tok.encode("hello world")])
    out = minitune.generate(model, ids, max_new_tokens=8)
    ref = hf_load(tmp_path / "out").generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert hf_tok.decode(ref[0]) == tok.decode(out[0])


def test_save_keeps_the_stop_ids_generation_config_listed(tmp_path):
    """Qwen2.5-Instruct's config.json says eos 151645, its generation_config.json [151645, 151643]:
    a model saved by minitune must still stop at both in transformers' generate."""
    import json

    from minitune.tokenizer.bpe_trainer import train_bpe

    write_checkpoint("qwen2", tmp_path / "src")
    train_bpe(["hello world, this is minitune."] * 20, vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
              eos_token="<|im_end|>").save(tmp_path / "src")
    model, tok = minitune.load_pretrained(tmp_path / "src")
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    both = sorted([im_end, eot])
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "eos_token_id": im_end}))
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, eot]}))
    model, tok = minitune.load_pretrained(tmp_path / "src")
    assert tok.stop_ids == both
    minitune.save_pretrained(model, tok, tmp_path / "out")
    assert minitune.load_pretrained(tmp_path / "out")[1].stop_ids == both
    assert sorted(transformers.GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id) == both
