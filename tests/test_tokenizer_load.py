"""load_tokenizer: which file it picks, and how bos/eos/pad and the chat template are resolved."""
import json

import pytest

from minitune.tokenizer import ByteLevelBPE, SentencePieceModel, TokenizerFileError, load_tokenizer
from minitune.tokenizer.bpe_trainer import train_bpe
from minitune.tokenizer.sample_text import mixed_text

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def bpe_spec():
    tok = train_bpe([mixed_text(20_000, seed=3)], vocab_size=400, special_tokens=SPECIALS)
    return tok.backend.spec


def _folder(tmp_path, spec, **files):
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    for name, content in files.items():
        path = tmp_path / name.replace("__", ".")
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return tmp_path


def test_special_tokens_from_tokenizer_config_strings_and_addedtoken_dicts(tmp_path, bpe_spec):
    d = _folder(tmp_path, bpe_spec, tokenizer_config__json={
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "special": True, "__type": "AddedToken"},
        "pad_token": "<|endoftext|>", "bos_token": None})
    tok = load_tokenizer(d)
    assert tok.eos_id == tok.token_to_id("<|im_end|>")
    assert tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_id is None


def test_ids_fall_back_to_generation_config_then_config(tmp_path, bpe_spec):
    eot = 400 - 1
    d = _folder(tmp_path, bpe_spec, generation_config__json={"eos_token_id": [eot, 5], "bos_token_id": 7},
                config__json={"eos_token_id": 1, "bos_token_id": 2, "pad_token_id": 3})
    tok = load_tokenizer(d)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (eot, 7, 3)


def test_null_in_tokenizer_config_means_none_even_if_generation_config_has_an_id(tmp_path, bpe_spec):
    # Qwen2.5 writes "bos_token": null while its generation_config.json says bos_token_id 151643.
    d = _folder(tmp_path, bpe_spec, tokenizer_config__json={"bos_token": None, "eos_token": "<|im_end|>"},
                generation_config__json={"bos_token_id": 397, "eos_token_id": 397})
    tok = load_tokenizer(d)
    assert tok.bos_id is None and tok.eos_id == tok.token_to_id("<|im_end|>")


def test_config_naming_a_token_outside_the_vocab_is_an_error(tmp_path, bpe_spec):
    d = _folder(tmp_path, bpe_spec, tokenizer_config__json={"eos_token": "<|nope|>"})
    with pytest.raises(TokenizerFileError, match="<\\|nope\\|>"):
        load_tokenizer(d)


def test_chat_template_from_config_or_jinja_file(tmp_path, bpe_spec):
    d = _folder(tmp_path, bpe_spec, tokenizer_config__json={"chat_template": "{{ messages }}"})
    assert load_tokenizer(d).chat_template == "{{ messages }}"
    (d / "tokenizer_config.json").unlink()
    assert load_tokenizer(d).chat_template is None
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert load_tokenizer(d).chat_template.startswith("{% for m")


def test_save_keeps_chat_template_and_special_tokens(tmp_path, bpe_spec):
    (tmp_path / "a").mkdir()
    d = _folder(tmp_path / "a", bpe_spec, tokenizer_config__json={"chat_template": "T", "eos_token": "<|im_end|>"})
    tok = load_tokenizer(d)
    tok.save(tmp_path / "b")
    again = load_tokenizer(tmp_path / "b")
    assert (again.chat_template, again.eos_id, again.encode("hi<|im_end|>")) == ("T", tok.eos_id, tok.encode("hi<|im_end|>"))


def test_tokenizer_json_is_preferred_over_tokenizer_model(tmp_path, bpe_spec):
    d = _folder(tmp_path, bpe_spec)
    (d / "tokenizer.model").write_bytes(b"unused")
    assert isinstance(load_tokenizer(d).backend, ByteLevelBPE)


def test_sentencepiece_style_tokenizer_json_falls_back_to_tokenizer_model(tmp_path, bpe_spec):
    import sentencepiece as spm
    (tmp_path / "c.txt").write_text(mixed_text(20_000, seed=5), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=600, model_type="bpe", byte_fallback=True,
                                   character_coverage=0.99, minloglevel=2)
    spec = dict(bpe_spec, pre_tokenizer={"type": "Metaspace", "replacement": "▁"})  # as LLaMA-2 ships it
    d = _folder(tmp_path, spec)
    assert isinstance(load_tokenizer(d).backend, SentencePieceModel)
    (d / "tokenizer.model").unlink()
    with pytest.raises(TokenizerFileError, match="Metaspace"):
        load_tokenizer(d)


def test_missing_folder_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="expected tokenizer.json .* or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_malformed_tokenizer_config_names_the_file(tmp_path, bpe_spec):
    d = _folder(tmp_path, bpe_spec, tokenizer_config__json="{oops")
    with pytest.raises(TokenizerFileError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(d)


def test_decode_accepts_a_tensor(tmp_path, bpe_spec):
    torch = pytest.importorskip("torch")
    tok = load_tokenizer(_folder(tmp_path, bpe_spec))
    ids = tok.encode("hello 你好")
    assert tok.decode(torch.tensor(ids)) == "hello 你好"


@pytest.mark.parametrize("files", [
    {"generation_config__json": {"eos_token_id": [398, 399]}, "config__json": {"eos_token_id": 5}},  # Qwen2.5-Instruct
    {"generation_config__json": {"eos_token_id": 397}, "config__json": {"eos_token_id": [5, 6]}},
    {"generation_config__json": {"bos_token_id": 1}, "config__json": {"eos_token_id": [5, 6]}},  # the file wins
    {"config__json": {"eos_token_id": [397, 5]}},  # no generation_config.json
])
def test_stop_ids_are_the_eos_ids_transformers_generate_stops_at(tmp_path, bpe_spec, files):
    """tok.stop_ids: the eos ids of generation_config.json if it exists, else of config.json (what
    transformers' from_pretrained puts in model.generation_config), plus eos_id; `minitune generate`
    and `chat` stop at any of them."""
    transformers = pytest.importorskip("transformers")
    d = _folder(tmp_path, bpe_spec, tokenizer_config__json={"eos_token": "<|im_end|>"}, **files)
    tok = load_tokenizer(d)
    if (d / "generation_config.json").exists():
        hf = transformers.GenerationConfig.from_pretrained(d).eos_token_id
    else:
        hf = transformers.GenerationConfig.from_model_config(transformers.PretrainedConfig.from_pretrained(d)).eos_token_id
    hf = hf if isinstance(hf, list) else [] if hf is None else [hf]
    assert tok.stop_ids == sorted(set(hf) | {tok.eos_id})
