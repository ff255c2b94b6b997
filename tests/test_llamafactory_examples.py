"""LLaMA-Factory's own example configs run with only model_name_or_path changed (issue 19):
examples/train_lora/qwen3_lora_sft.yaml, train_qlora/qwen3_lora_sft_otfq.yaml, train_lora/qwen3_lora_dpo.yaml
and train_lora/qwen3_lora_reward.yaml (LLaMA-Factory main, August 2026), on a data/ folder laid out as
LLaMA-Factory's (dataset_info.json entries as its own: identity, alpaca_en_demo, dpo_en_demo), with
--max_steps 2. Plus the data keys they use or comment out: eval_dataset, mix_strategy, default_system."""

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from minitune.cli import main
from minitune.data.templates import TEMPLATES

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "weights/tiny"
needs_tiny = pytest.mark.skipif(not (TINY / "config.json").exists(), reason="weights/tiny is not built yet")
needs_qwen3_nothink = pytest.mark.skipif("qwen3_nothink" not in TEMPLATES, reason="template qwen3_nothink not here")

COMMON_TAIL = """\
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: {lr}
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# eval_dataset: {data}
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""


def example(head: str, data: str, out: str, lr: str) -> str:
    return head + f"dataset: {data}\ntemplate: qwen3_nothink\n" + COMMON_TAIL.format(out=out, lr=lr, data=data)


MODEL = "### model\nmodel_name_or_path: Qwen/Qwen3-4B-Instruct-2507\ntrust_remote_code: true\n\n"
LORA = "### method\nstage: {stage}\ndo_train: true\nfinetuning_type: lora\nlora_rank: 8\nlora_target: all\n"
EXAMPLES = {
    "qwen3_lora_sft": example(MODEL + LORA.format(stage="sft") + "\n### dataset\n", "identity,alpaca_en_demo",
                              "saves/qwen3-4b/lora/sft", "1.0e-4"),
    "qwen3_lora_sft_otfq": example(
        MODEL.replace("trust_remote_code", "quantization_bit: 4  # choices: [8 (bnb/hqq/eetq), 4 (bnb/hqq), 3 (hqq), "
                      "2 (hqq)]\nquantization_method: bnb  # choices: [bnb, hqq, eetq]\ntrust_remote_code")
        + LORA.format(stage="sft") + "\n### dataset\n", "identity,alpaca_en_demo", "saves/qwen3-4b/lora/sft", "1.0e-4"),
    "qwen3_lora_dpo": example(MODEL + LORA.format(stage="dpo") + "pref_beta: 0.1\npref_loss: sigmoid  # choices: "
                              "[sigmoid (dpo), orpo, simpo]\n\n### dataset\n", "dpo_en_demo", "saves/qwen3-4b/lora/dpo",
                              "5.0e-6"),
    "qwen3_lora_reward": example(MODEL + LORA.format(stage="rm") + "\n### dataset\n", "dpo_en_demo",
                                 "saves/qwen3-4b/lora/reward", "1.0e-4"),
}


# examples/inference/qwen3_lora_sft.yaml and examples/merge_lora/qwen3_lora_sft.yaml, as printed there
INFERENCE = """\
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
adapter_name_or_path: saves/qwen3-4b/lora/sft
template: qwen3_nothink
infer_backend: huggingface  # choices: [huggingface, vllm, sglang, ktransformers]
trust_remote_code: true
"""
MERGE = """\
### Note: DO NOT use quantized model or quantization_bit when merging lora adapters

### model
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
adapter_name_or_path: saves/qwen3-4b/lora/sft
template: qwen3_nothink
trust_remote_code: true

### export
export_dir: saves/qwen3_sft_merged
export_size: 5
export_device: cpu  # choices: [cpu, auto]
export_legacy_format: false
"""


def write_data_folder(root: Path) -> None:
    """data/ as LLaMA-Factory ships it, with a few records of each demo set in its own layout."""
    data = root / "data"
    data.mkdir()
    identity = [{"instruction": q, "input": "", "output": "I am {{name}}, an AI assistant developed by {{author}}."}
                for q in ("hi", "Who are you?", "What is your name?", "Introduce yourself")]
    alpaca = [{"instruction": "Add the numbers.", "input": f"{a} and {b}", "output": str(a + b)}
              for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    dpo = [{"conversations": [{"from": "human", "value": f"What is {a}+{a}?"}],
            "chosen": {"from": "gpt", "value": str(2 * a)}, "rejected": {"from": "gpt", "value": "I don't know."}}
           for a in range(1, 7)]
    (data / "identity.json").write_text(json.dumps(identity))
    (data / "alpaca_en_demo.json").write_text(json.dumps(alpaca))
    (data / "dpo_en_demo.json").write_text(json.dumps(dpo))
    (data / "dataset_info.json").write_text(json.dumps({
        "identity": {"file_name": "identity.json"},
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    }))


@needs_tiny
@needs_qwen3_nothink
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_llamafactory_qwen3_example_config_trains_with_only_the_model_path_changed(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_data_folder(tmp_path)
    (tmp_path / f"{name}.yaml").write_text(EXAMPLES[name].replace("Qwen/Qwen3-4B-Instruct-2507", str(TINY)))
    main(["train", f"{name}.yaml", "--max_steps", "2", "--gradient_accumulation_steps", "1"])
    out = tmp_path / EXAMPLES[name].split("output_dir: ")[1].split("\n")[0]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    if name == "qwen3_lora_reward":
        assert (out / "value_head.safetensors").exists()
    if name == "qwen3_lora_sft":  # then chat and merge with the inference and merge_lora examples
        for verb, text in (("chat", INFERENCE), ("export", MERGE)):
            (tmp_path / f"{verb}.yaml").write_text(text.replace("Qwen/Qwen3-4B-Instruct-2507", str(TINY)))
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdin", io.StringIO("Who are you?\n/exit\n"))
        main(["chat", "chat.yaml", "--max_new_tokens", "4", "--device", "cpu"])
        assert "Assistant: " in capsys.readouterr().out
        main(["export", "export.yaml"])
        assert (tmp_path / "saves/qwen3_sft_merged/config.json").exists()


@needs_tiny
def test_a_lora_reward_model_saves_adapter_and_value_head_and_loads_back_with_the_same_scores(tmp_path, monkeypatch):
    from minitune.rlhf import reward

    monkeypatch.chdir(tmp_path)
    write_data_folder(tmp_path)
    trained = {}
    real_train = reward.train_reward_model

    def spy(rm, data, cfg, tok, **kw):
        trained["rm"], trained["data"], trained["tok"] = rm, data, tok
        return real_train(rm, data, cfg, tok, **kw)

    monkeypatch.setattr("minitune.cli.train_reward_model", spy)
    main(["train", "--stage", "rm", "--finetuning_type", "lora", "--model_name_or_path", str(TINY), "--dataset",
          "dpo_en_demo", "--output_dir", "rm", "--max_steps", "2", "--learning_rate", "1e-2", "--save_steps", "0",
          "--per_device_train_batch_size", "2", "--lora_target", "all"])
    assert not (tmp_path / "rm/model.safetensors").exists()  # the adapter, not a copy of the backbone
    loaded, tok = reward.load_reward_model(tmp_path / "rm", dtype=torch.float32)  # trained in fp32
    rm = trained["rm"].eval()
    ids = torch.tensor([trained["data"].train[0]["chosen_input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids), rm(ids), rtol=1e-5, atol=1e-5)
    assert float(rm.value_head.weight.abs().sum()) > 0


@needs_tiny
def test_eval_dataset_is_the_evaluation_data_instead_of_a_split(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_data_folder(tmp_path)
    main(["train", "--model_name_or_path", str(TINY), "--dataset", "identity", "--eval_dataset", "alpaca_en_demo",
          "--output_dir", "out", "--max_steps", "2", "--eval_steps", "1", "--save_steps", "0",
          "--per_device_train_batch_size", "2"])
    shown = capsys.readouterr().out
    assert "eval_dataset: 4 examples" in shown or "eval_dataset: " in shown
    log = [json.loads(line) for line in (tmp_path / "out/trainer_log.jsonl").read_text().splitlines()]
    assert any("eval_loss" in row for row in log)


@pytest.mark.parametrize("flags, message", [
    (["--mix_strategy", "interleave_under"], "mix_strategy: 'interleave_under': only concat is implemented"),
    (["--eval_dataset", "a", "--val_size", "0.1"], "eval_dataset: and val_size 0.1 both set"),
])
def test_data_mixing_keys_minitune_cannot_honour_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_default_system_replaces_the_templates_own_system_prompt():
    from minitune.train.config import TrainConfig

    messages = [{"role": "user", "content": "hi"}]
    assert "You are Qwen" in TrainConfig(template="qwen").chat_template.render(messages)
    text = TrainConfig(template="qwen", default_system="You are a tiny model.").chat_template.render(messages)
    assert text.startswith("<|im_start|>system\nYou are a tiny model.<|im_end|>\n") and "Qwen" not in text


def test_enable_thinking_false_makes_the_empty_think_block_context_in_training_and_chat():
    import argparse

    from minitune.chat import chosen_template
    from minitune.train.config import TrainConfig

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    on = TrainConfig(template="qwen3").chat_template.segments(messages)
    off = TrainConfig(template="qwen3", enable_thinking=False).chat_template.segments(messages)
    assert [t for t, trainable in on if trainable][0].startswith("<think>\n\n</think>\n\n")  # learnt to write it
    assert [t for t, trainable in off if trainable][0] == "hello<|im_end|>"  # given to it instead
    assert [t for t, trainable in off if not trainable][0].endswith("<think>\n\n</think>\n\n")
    args = argparse.Namespace(template="qwen3", enable_thinking=False)
    prompt = chosen_template(args).render(messages[:1], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
