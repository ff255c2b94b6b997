"""`torchrun --nproc_per_node 2 -m minitune train ...` as the README and lesson 14 print it, on CPU (gloo):
LLaMA-Factory's own multi-GPU example (examples/train_lora/qwen3_lora_sft_ds3.yaml, with its
`deepspeed: examples/deepspeed/ds_z3_config.json`) runs sharded with only the model path changed; DPO
with `--fsdp full_shard`; PPO and GRPO with the actor sharded; and an RL stage on several processes
without sharding is a one-line error (torchrun then reports the exit code with its own traceback). Each case starts 2 processes (~10 s each on 2 cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_llamafactory_examples import EXAMPLES, TINY, needs_qwen3_nothink, needs_tiny, write_data_folder

ROOT = Path(__file__).resolve().parents[1]

# examples/train_lora/qwen3_lora_sft_ds3.yaml: qwen3_lora_sft.yaml plus one deepspeed line, accumulation 2
DS3_EXAMPLE = EXAMPLES["qwen3_lora_sft"].replace(
    "lora_target: all\n", "lora_target: all\ndeepspeed: examples/deepspeed/ds_z3_config.json  # choices: "
    "[ds_z0_config.json, ds_z2_config.json, ds_z3_config.json]\n").replace(
    "gradient_accumulation_steps: 8", "gradient_accumulation_steps: 2")
# the keys of LLaMA-Factory's ds_z3_config.json that matter here; "auto" values are HF Trainer's to fill
DS3 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
       "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"},
       "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                             "stage3_gather_16bit_weights_on_model_save": True}}


def torchrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minitune", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.fixture
def folder(tmp_path):
    write_data_folder(tmp_path)
    (tmp_path / "examples/deepspeed").mkdir(parents=True)
    (tmp_path / "examples/deepspeed/ds_z3_config.json").write_text(json.dumps(DS3, indent=2))
    return tmp_path


@needs_tiny
@needs_qwen3_nothink
@pytest.mark.slow
def test_llamafactory_ds3_example_runs_sharded_under_torchrun(folder):
    (folder / "ds3.yaml").write_text(DS3_EXAMPLE.replace("Qwen/Qwen3-4B-Instruct-2507", str(TINY)))
    text = ok(torchrun(folder, "ds3.yaml", "--max_steps", "2", "--save_steps", "1"))
    assert "ZeRO stage 3 runs as fsdp 'full_shard'" in text
    assert text.count("trained 2 steps") == 1  # rank 0 reports, and saves
    out = folder / "saves/qwen3-4b/lora/sft"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert sorted(p.name for p in (out / "checkpoint-2").glob("shard-*")) == [
        "shard-rank0-of-2.safetensors", "shard-rank1-of-2.safetensors"]


@needs_tiny
@needs_qwen3_nothink
@pytest.mark.slow
def test_dpo_runs_sharded_under_torchrun(folder):
    (folder / "dpo.yaml").write_text(EXAMPLES["qwen3_lora_dpo"].replace("Qwen/Qwen3-4B-Instruct-2507", str(TINY)))
    text = ok(torchrun(folder, "dpo.yaml", "--max_steps", "2", "--gradient_accumulation_steps", "1",
                       "--fsdp", "full_shard"))
    assert "dpo: trained 2 steps" in text
    assert (folder / "saves/qwen3-4b/lora/dpo/adapter_model.safetensors").exists()


def prompts(folder: Path) -> Path:
    data = folder / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {a}+{b}?", "input": "", "output": str(a + b)}) + "\n"
                            for a, b in ((1, 2), (3, 4), (5, 6), (7, 1))))
    return data


@needs_tiny
@pytest.mark.slow
@pytest.mark.parametrize("stage,finetuning_type,option", [("ppo", "lora", "full_shard"),
                                                          ("grpo", "full", "shard_grad_op")])
def test_ppo_and_grpo_run_sharded_under_torchrun(folder, stage, finetuning_type, option):
    out = folder / "out"
    text = ok(torchrun(folder, "--stage", stage, "--finetuning_type", finetuning_type, "--model_name_or_path",
                       str(TINY), "--dataset", str(prompts(folder)), "--output_dir", str(out), "--max_steps", "2",
                       "--per_device_train_batch_size", "1", "--num_generations", "2", "--max_new_tokens", "4",
                       "--ppo_epochs", "1", "--fsdp", option))
    assert text.count(f"{stage}: 2 steps") == 1
    records = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # one log, rank 0's: the whole batch of both ranks
    assert (out / ("adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors")).exists()


@needs_tiny
@pytest.mark.slow
def test_an_rl_stage_on_two_processes_without_sharding_is_a_one_line_error(folder):
    res = torchrun(folder, "--stage", "ppo", "--finetuning_type", "lora", "--model_name_or_path", str(TINY),
                   "--dataset", str(prompts(folder)), "--output_dir", str(folder / "out"), "--max_steps", "1")
    assert res.returncode != 0
    assert "error: stage ppo on 2 processes runs sharded: set fsdp" in res.stderr
    assert "exitcode: 2" in res.stderr  # each process: one line and exit 2; the traceback after it is torchrun's
    assert "minitune/cli.py" not in res.stderr and "ChildFailedError" in res.stderr
