"""Data sets by name (LLaMA-Factory's data/dataset_info.json): file_name, formatting, ranking, columns and
tags read as LLaMA-Factory reads them; a path still works; bad names and columns are clear errors; seed
003's config runs as printed with only the model path changed."""

import io
import json
from pathlib import Path

import pytest

from minitune.cli import main
from minitune.data.registry import load_pair_records, load_sft, resolve_datasets
from minitune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ALPACA = [{"instruction": f"Fix: {w} are here", "input": "", "output": f"{w} is here"} for w in ("cat", "dog", "sun")]


def write(folder: Path, info: dict, files: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(info))
    for name, rows in files.items():
        (folder / name).write_text(json.dumps(rows))
    return folder


def test_a_registered_name_reads_its_file_with_alpaca_columns_by_default(tmp_path):
    data = write(tmp_path / "data", {"grammar": {"file_name": "instruction.json"}}, {"instruction.json": ALPACA})
    [spec] = resolve_datasets(["grammar"], data)
    messages = load_sft(spec).examples[0]
    assert messages == [{"role": "user", "content": "Fix: cat are here"}, {"role": "assistant", "content": "cat is here"}]


def test_max_samples_keeps_the_first_n_of_each_data_set(tmp_path):
    data = write(tmp_path / "data", {"a": {"file_name": "a.json"}}, {"a.json": ALPACA})
    assert len(load_sft(resolve_datasets(["a"], data)[0], max_samples=2).examples) == 2


def test_sharegpt_columns_and_tags_map_to_roles(tmp_path):
    rows = [{"msgs": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "sys": "be kind"}]
    info = {"chat": {"file_name": "c.json", "formatting": "sharegpt", "columns": {"messages": "msgs", "system": "sys"},
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant"}}}
    data = write(tmp_path / "data", info, {"c.json": rows})
    assert load_sft(resolve_datasets(["chat"], data)[0]).examples[0] == [
        {"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]


def test_sharegpt_ranking_records_become_prompt_chosen_rejected(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
             "rejected": {"from": "gpt", "value": "5"}}]
    info = {"dpo": {"file_name": "d.json", "formatting": "sharegpt", "ranking": True,
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}
    data = write(tmp_path / "data", info, {"d.json": rows})
    assert load_pair_records(resolve_datasets(["dpo"], data)[0]) == [
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}]


def test_alpaca_ranking_joins_instruction_and_input(tmp_path):
    rows = [{"instruction": "Add", "input": "2+2", "chosen": "4", "rejected": "5"}]
    data = write(tmp_path / "data", {"p": {"file_name": "p.json", "ranking": True}}, {"p.json": rows})
    assert load_pair_records(resolve_datasets(["p"], data)[0]) == [{"prompt": "Add\n2+2", "chosen": "4", "rejected": "5"}]


def test_a_path_still_works_beside_the_registry(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps(ALPACA))
    [spec] = resolve_datasets([str(tmp_path / "x.json")], tmp_path / "nothing")
    assert len(load_sft(spec).examples) == 3


def test_an_unknown_name_lists_the_registered_ones(tmp_path):
    data = write(tmp_path / "data", {"identity": {"file_name": "i.json"}, "grammar": {"file_name": "g.json"}}, {})
    with pytest.raises(UserError, match=r"dataset 'identiy': neither a file nor a data set registered in .*"
                                        r"dataset_info.json \(registered: identity, grammar\)"):
        resolve_datasets(["identiy"], data)


def test_a_column_naming_a_field_the_record_lacks_names_both(tmp_path):
    info = {"g": {"file_name": "g.json", "columns": {"prompt": "question", "response": "answer"}}}
    data = write(tmp_path / "data", info, {"g.json": [{"question": "q?", "reply": "a"}]})
    with pytest.raises(UserError, match=r"g.json line 1: columns maps 'response' to field 'answer', which this "
                                        r"record lacks \(its fields: question, reply\)"):
        load_sft(resolve_datasets(["g"], data)[0])


def test_a_hub_data_set_is_a_clear_error_only_when_asked_for(tmp_path):
    info = {"local": {"file_name": "l.json"}, "remote": {"hf_hub_url": "someone/data"}}
    data = write(tmp_path / "data", info, {"l.json": ALPACA})
    assert resolve_datasets(["local"], data)[0].name == "local"
    with pytest.raises(UserError, match="'remote' is a hub data set; minitune reads local files only"):
        resolve_datasets(["remote"], data)


SEED_003 = """\
### model
model_name_or_path: Qwen/Qwen2-1.5B-Instruct

### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all

### dataset
dataset: grammar
template: llama3
cutoff_len: 1024
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/Qwen2-1.5B-Instruct/lora/sft
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


@pytest.mark.skipif(not (ROOT / "weights/tiny/config.json").exists(), reason="weights/tiny is not built yet")
def test_seed_003_config_trains_then_chats_and_merges_with_only_the_model_path_changed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # LLaMA-Factory's layout: data/dataset_info.json beside the config, paths relative
    rows = [{"instruction": f"Correct the grammar: he {v} home", "input": "", "output": f"He {v}s home."}
            for v in ("walk", "run", "drive", "ride")] * 5
    write(tmp_path / "data", {"grammar": {"file_name": "instruction.json"}}, {"instruction.json": rows})
    (tmp_path / "qwen-sft.yaml").write_text(
        SEED_003.replace("Qwen/Qwen2-1.5B-Instruct\n", f"{ROOT / 'weights/tiny'}\n", 1))
    main(["train", "qwen-sft.yaml", "--max_steps", "2"])
    out = tmp_path / "saves/Qwen2-1.5B-Instruct/lora/sft"
    assert (out / "adapter_model.safetensors").exists() and (out / "training_loss.png").exists()
    assert "trained 2 steps" in capsys.readouterr().out
    # then chat with the adapter and merge it, as the seed goes on to do (LLaMA-Factory's inference / merge yaml)
    model = str(ROOT / "weights/tiny")
    (tmp_path / "chat.yaml").write_text(f"model_name_or_path: {model}\nadapter_name_or_path: {out}\ntemplate: qwen\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("Correct the grammar: he walk home\n/exit\n"))
    main(["chat", "chat.yaml", "--max_new_tokens", "4", "--device", "cpu"])
    assert "Assistant: " in capsys.readouterr().out
    (tmp_path / "merge.yaml").write_text(f"model_name_or_path: {model}\nadapter_name_or_path: {out}\n"
                                         "export_dir: saves/merged\nexport_size: 1\n")
    main(["export", "merge.yaml"])
    assert (tmp_path / "saves/merged/config.json").exists()
