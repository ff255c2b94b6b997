"""`minitune export x.yaml` (llamafactory-cli export): a LoRA adapter folded into its base gives a plain
checkpoint that transformers loads with the adapted model's logits, sharded by export_size; what cannot
be merged, and a used export_dir, are clear errors."""

import json

import pytest
import torch
from hf_factory import rel_error
from test_cli import tiny_dir  # noqa: F401 (the fixture: a random tiny model with a BPE tokenizer)

import minitune
from minitune.cli import main
from minitune.peft import load_adapter

torch.set_num_threads(1)


def train(tiny_dir, tmp_path, ft="lora"):
    rows = [{"instruction": f"Say {w}", "output": f"{w} {w}"} for w in ("cat", "mat", "two", "four")] * 2
    (tmp_path / "data.json").write_text(json.dumps(rows))
    out = tmp_path / f"saves-{ft}"
    main(["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(tmp_path / "data.json"),
          "--output_dir", str(out), "--finetuning_type", ft, "--max_steps", "3", "--learning_rate", "1e-2",
          "--per_device_train_batch_size", "2", "--device", "cpu"])
    return out


def test_exported_lora_merge_loads_in_transformers_with_the_adapted_logits(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = train(tiny_dir, tmp_path)
    (tmp_path / "merge.yaml").write_text(  # LLaMA-Factory's examples/merge_lora layout
        f"model_name_or_path: {tiny_dir}\nadapter_name_or_path: {adapter}\ntemplate: qwen\nfinetuning_type: lora\n"
        f"export_dir: {tmp_path / 'merged'}\nexport_size: 0.00005\nexport_device: cpu\nexport_legacy_format: false\n")
    main(["export", str(tmp_path / "merge.yaml")])
    merged = tmp_path / "merged"
    assert (merged / "model.safetensors.index.json").exists()  # 50 kB shards: several files
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_adapter(minitune.load_pretrained(tiny_dir)[0], adapter).eval()(ids)
        unadapted = minitune.load_pretrained(tiny_dir)[0].eval()(ids)
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    assert rel_error(got, want) < 1e-5  # fp32: only the order of the additions differs
    assert rel_error(unadapted, want) > 1e-3  # the adapter did change the model


def test_export_refuses_a_used_folder_a_prompt_adapter_and_pickles(tiny_dir, tmp_path, capsys):
    adapter = train(tiny_dir, tmp_path, "prefix")
    base = ["export", "--model", str(tiny_dir)]
    cases = [([*base, "--adapter", str(adapter), "--export_dir", str(tmp_path / "a")], "not a LoRA / AdaLoRA adapter"),
             ([*base, "--export_dir", str(adapter)], "not empty; choose a new folder"),
             ([*base, "--export_dir", str(tmp_path / "b"), "--export_legacy_format", "true"], "safetensors only")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
