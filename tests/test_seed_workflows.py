"""Seed 001's workflow as the tutorial runs it with llamafactory-cli: QLoRA training from a yaml
(quantization_bit: 4, dataset: identity from data/dataset_info.json), then `chat` with an inference
yaml naming the adapter; only model_name_or_path changed to the tiny model."""

import io
import json
import sys
from pathlib import Path

import pytest

from minitune.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "weights/tiny"

# the keys seed 001 lists for qwen_lora_sft_bitsandbytes.yaml, in its order
SEED_001_TRAIN = """\
### model
model_name_or_path: Qwen2.5-7B-Instruct
quantization_bit: 4

### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all

### dataset
dataset: identity
template: qwen
cutoff_len: 1024
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/qwen-7b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

SEED_001_CHAT = """\
model_name_or_path: Qwen2.5-7B-Instruct
adapter_name_or_path: saves/qwen-7b/lora/sft
template: qwen
finetuning_type: lora
"""


@pytest.mark.skipif(not (TINY / "config.json").exists(), reason="weights/tiny is not built yet")
def test_seed_001_qlora_train_then_chat_with_its_yaml_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    identity = [{"instruction": q, "input": "", "output": "I am {{name}}, an AI assistant developed by {{author}}."}
                for q in ("hi", "Who are you?", "What is your name?", "Introduce yourself")] * 4
    (tmp_path / "data").mkdir()
    (tmp_path / "data/identity.json").write_text(json.dumps(identity))
    (tmp_path / "data/dataset_info.json").write_text(json.dumps({"identity": {"file_name": "identity.json"}}))
    (tmp_path / "train.yaml").write_text(SEED_001_TRAIN.replace("Qwen2.5-7B-Instruct", str(TINY)))
    (tmp_path / "chat.yaml").write_text(SEED_001_CHAT.replace("Qwen2.5-7B-Instruct", str(TINY)))
    main(["train", "train.yaml", "--max_steps", "2"])
    out = tmp_path / "saves/qwen-7b/lora/sft"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (out / "adapter_model.safetensors").exists()
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who are you?\n/exit\n"))
    main(["chat", "chat.yaml", "--max_new_tokens", "4", "--device", "cpu"])
    shown = capsys.readouterr()
    assert "Assistant: " in shown.out
    assert "finetuning_type (the adapter folder says which method it holds)" in shown.err
    # seed 000's last step: merge the LoRA weights into the base (LLaMA-Factory's merge_lora yaml form)
    (tmp_path / "merge.yaml").write_text(SEED_001_CHAT.replace("Qwen2.5-7B-Instruct", str(TINY))
                                         + "export_dir: saves/qwen-7b/merged\nexport_size: 2\nexport_device: cpu\n"
                                           "export_legacy_format: false\n")
    main(["export", "merge.yaml"])
    assert (tmp_path / "saves/qwen-7b/merged/config.json").exists()


def test_an_unknown_key_in_an_inference_yaml_names_the_file_and_the_key(tmp_path, capsys):
    (tmp_path / "chat.yaml").write_text("model_name_or_path: x\ntemprature: 0.5\n")
    with pytest.raises(SystemExit) as e:
        main(["chat", str(tmp_path / "chat.yaml")])
    assert e.value.code == 2 and "chat.yaml: unknown key 'temprature'" in capsys.readouterr().err


def test_unsupported_quantization_bit_says_what_is_supported(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--quantization_bit", "8", "--finetuning_type", "lora"])
    assert e.value.code == 2 and "quantization_bit: 8 is not supported (expected 4" in capsys.readouterr().err
