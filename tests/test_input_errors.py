"""Input a user can fix fails as a UserError naming the file (line, field or tensor) and what was expected,
never as a bare UnicodeDecodeError / TypeError from deep inside; files we save are readable like any other."""

import argparse
import json
import os
import re
import stat

import pytest
import torch

import minitune
from minitune.chat import run_generate
from minitune.data.dataset import check_cutoff_len
from minitune.data.formats import DataError, load_examples
from minitune.errors import UserError
from minitune.generation import GenerationError
from minitune.model import CheckpointError, ConfigError, ModelConfig, Transformer
from minitune.peft.adapter_files import AdapterError, read_adapter_dir, write_adapter_dir
from minitune.peft.prompt import PromptTuningModel
from minitune.train.config import TrainConfigError

GOOD = {"instruction": "Say hi", "output": "hi"}
TINY = os.path.join(os.path.dirname(__file__), "..", "weights", "tiny")


def tiny_model(context=16) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=context)
    return Transformer(cfg).eval()


def set_header(file, fn):
    """Rewrite a safetensors file's JSON header with fn(header), keeping its tensor bytes."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header).encode()
    file.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


# ----------------------------------------------------------------------------- data files


def test_non_utf8_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(GOOD).encode()] * 2 + ['{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1")]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match="^" + re.escape(f"{path} line 3: not UTF-8 text (byte 0xe9 at column 21; "
                                                        "data files must be UTF-8 encoded)")):
        load_examples(path)


def test_non_utf8_json_array_names_the_line_of_the_bad_byte(tmp_path):
    path = tmp_path / "train.json"
    bad = json.dumps({"instruction": "caf\xe9", "output": "x"}, ensure_ascii=False)
    text = "[\n" + json.dumps(GOOD) + ",\n" + bad + "\n]"
    path.write_bytes(text.encode("cp1252"))
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: not UTF-8 text (byte 0xe9")):
        load_examples(path)


def test_utf8_with_a_byte_order_mark_and_a_raw_line_separator_in_a_string_reads(tmp_path):
    path = tmp_path / "train.jsonl"
    rec = json.dumps({"instruction": "one\u2028two", "output": "x"}, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + (rec + "\n" + json.dumps(GOOD) + "\n").encode())
    assert [ex[0]["content"] for ex in load_examples(path)] == ["one\u2028two", "Say hi"]


# ----------------------------------------------------------------------------- config.json


@pytest.fixture
def config_file(tmp_path):
    d = tiny_model().config.to_hf_dict()

    def write(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**d, **changes}))
        return tmp_path / "config.json"
    return write


@pytest.mark.parametrize("field, value, shown, expected", [
    ("hidden_size", "192", '"192", a string', "a positive integer"),
    ("num_hidden_layers", 2.0, "2.0, a number", "a positive integer"),
    ("vocab_size", True, "true, a boolean", "a positive integer"),
    ("hidden_size", 0, "0, an integer", "a positive integer"),
    ("max_position_embeddings", -1, "-1, an integer", "a positive integer"),
    ("rms_norm_eps", "1e-6", '"1e-6", a string', "a positive number"),
    ("tie_word_embeddings", "false", '"false", a string', "true or false"),
    ("rope_scaling", ["linear", 2.0], '["linear", 2.0], a list', "an object or null"),
    ("eos_token_id", "2", '"2", a string', "a token id, a list of token ids, or null"),
    ("torch_dtype", "fp17", '"fp17", a string', 'a floating-point dtype name such as "bfloat16"'),
])
def test_config_json_field_of_the_wrong_type_is_named(config_file, field, value, shown, expected):
    path = config_file(**{field: value})
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: field {field!r} is {shown} (expected {expected}")):
        ModelConfig.from_file(path)


def test_config_json_rope_scaling_values_and_head_counts_are_checked(config_file):
    path = config_file(rope_scaling={"rope_type": "linear", "factor": "2"})
    with pytest.raises(ConfigError, match=re.escape("field 'rope_scaling.factor' is \"2\", a string")):
        ModelConfig.from_file(path)
    path = config_file(rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ConfigError, match="rope_scaling of rope_type 'llama3' has no 'original_max_position_emb"):
        ModelConfig.from_file(path)
    path = config_file(hidden_size=18, num_attention_heads=4, num_key_value_heads=4, head_dim=None)
    with pytest.raises(ConfigError, match="hidden_size 18 is not a multiple of num_attention_heads 4"):
        ModelConfig.from_file(path)
    # ints are numbers
    assert ModelConfig.from_file(config_file(rms_norm_eps=1, rope_theta=10000)).rope_theta == 10000.0


# ----------------------------------------------------------------------------- safetensors files


def test_safetensors_header_with_wrong_typed_offsets_is_a_checkpoint_error(tmp_path):
    minitune.save_pretrained(tiny_model(), None, tmp_path)
    set_header(tmp_path / "model.safetensors", lambda h: h["model.norm.weight"].update(data_offsets=["0", "12"]))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'model.safetensors'}: damaged or not a safetensors file: tensor 'model.norm.weight' "
            'has data_offsets ["0", "12"] (expected two integers')):
        minitune.load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="damaged or not a safetensors file: header is not valid JSON"):
        minitune.load_model(tmp_path)


def test_damaged_adapter_weights_are_an_adapter_error(tmp_path):
    write_adapter_dir(tmp_path, {"peft_type": "LORA"}, {"base_model.model.x.lora_A.weight": torch.zeros(2, 3)})
    weights = tmp_path / "adapter_model.safetensors"
    set_header(weights, lambda h: h["base_model.model.x.lora_A.weight"].update(data_offsets=["0", "24"]))
    with pytest.raises(AdapterError, match="^" + re.escape(f"{weights}: damaged or not a safetensors file (")):
        read_adapter_dir(tmp_path)
    weights.write_bytes(weights.read_bytes()[:12])  # truncated
    with pytest.raises(AdapterError, match="damaged or not a safetensors file"):
        read_adapter_dir(tmp_path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_model_files_are_world_readable(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        minitune.save_pretrained(tiny_model(), None, tmp_path / "model")
        write_adapter_dir(tmp_path / "adapter", {"peft_type": "LORA"}, {"a": torch.zeros(2)})
    finally:
        os.umask(old)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "adapter_model.safetensors"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(mode) for p in files}


def test_checkpoint_files_of_a_trainable_subset_are_world_readable(tmp_path):
    from minitune.train import TrainConfig, train

    model = tiny_model()
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # few trainable parameters: trainable_params.safetensors
    data = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}] * 2
    old = os.umask(0o022)
    try:
        train(model, data, TrainConfig(max_steps=1, per_device_train_batch_size=2, save_steps=1, device="cpu",
                                       output_dir=str(tmp_path)))
    finally:
        os.umask(old)
    saved = tmp_path / "checkpoint-1" / "trainable_params.safetensors"
    assert oct(stat.S_IMODE(saved.stat().st_mode)) == oct(0o644)


# ----------------------------------------------------------------------------- the context


def test_generate_refuses_a_prompt_longer_than_the_context():
    model = tiny_model(context=16)
    with pytest.raises(GenerationError, match=re.escape(
            "the prompt is 20 tokens; the model's context (max_position_embeddings) is 16 tokens "
            "(expected a prompt of at most 15")):
        minitune.generate(model, torch.zeros(1, 20, dtype=torch.long), 4)
    assert minitune.generate(model, torch.zeros(1, 12, dtype=torch.long), 10).shape == (1, 16)  # cut at the context
    # left padding takes no position; prompt tuning's virtual tokens do
    mask = torch.tensor([[0] * 8 + [1] * 12])
    assert minitune.generate(model, torch.zeros(1, 20, dtype=torch.long), 10, attention_mask=mask).shape == (1, 24)
    soft = PromptTuningModel(tiny_model(context=16), num_virtual_tokens=4)
    with pytest.raises(GenerationError, match="the prompt is 16 tokens with the 4 virtual tokens"):
        minitune.generate(soft, torch.zeros(1, 12, dtype=torch.long), 4)


def test_cli_generate_refuses_a_prompt_that_leaves_no_room_for_max_new_tokens():
    args = argparse.Namespace(model=TINY, adapter=None, template=None, system=None, prompt="the cat " * 200,
                              max_new_tokens=256, temperature=0.0, top_k=None, top_p=None, seed=None,
                              device="cpu", dtype="auto")
    with pytest.raises(GenerationError, match=r"^--prompt: it makes a \d+-token prompt; the model's context is 512 "
                                              r"tokens \(max_position_embeddings in .*config\.json\) and "
                                              r"--max_new_tokens 256 must fit too"):
        run_generate(args)


def test_cutoff_len_above_the_context_is_an_error(tmp_path):
    model = tiny_model(context=16)
    check_cutoff_len(16, model, tmp_path)  # fits
    with pytest.raises(UserError, match="^" + re.escape(
            f"cutoff_len: 17 is longer than the model's context: {tmp_path / 'config.json'} has "
            "max_position_embeddings 16 (expected cutoff_len <= 16)")):
        check_cutoff_len(17, model, tmp_path)
    with pytest.raises(UserError, match=re.escape("(expected cutoff_len <= 12, less the adapter's 4 virtual")):
        check_cutoff_len(16, PromptTuningModel(model, num_virtual_tokens=4), tmp_path)


def test_every_error_here_is_a_user_error():
    for cls in (DataError, ConfigError, CheckpointError, AdapterError, GenerationError, TrainConfigError):
        assert issubclass(cls, UserError)
