"""The GPU benchmarks of issue 24 (QLoRA at a 7B shape, the PPO/GRPO step split) run on the CPU with
--smoke, and the random-checkpoint writer they use writes a sharded folder transformers and minitune
both read, with the Qwen2.5-7B shape's exact parameter count. These check the scripts, not speed."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from minitune import memory
from minitune.model import ModelConfig, load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_thread_count():
    """--smoke runs single-threaded (torch.set_num_threads(1)); the tests after these keep their threads."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # in this process: torch and transformers are imported already
    return module


def test_random_7b_config_has_qwen2_5_7b_parameter_count_and_layers_option():
    rc = bench_module("random_checkpoint")
    cfg = ModelConfig.from_hf_dict(rc.hf_config("qwen2.5-7b"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (3584, 28, 28, 4, 18944, 152064, False)
    assert memory.count_parameters(cfg) == 7_615_616_512  # Qwen2.5-7B's count (15,231,233,024 bytes in bf16)
    assert ModelConfig.from_hf_dict(rc.hf_config("qwen2.5-7b", layers=2)).num_hidden_layers == 2
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(28)] + ["model.embed_tokens.weight",
                                                                          "model.norm.weight", "lm_head.weight"]
    groups = rc.shard_groups(names, 28, 4)  # embedding, 7 groups of 4 blocks, norm + head
    assert len(groups) == 9 and sorted(sum(groups, [])) == sorted(names) and max(map(len, groups)) == 4


def test_random_checkpoint_is_written_shard_by_shard_and_transformers_reads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    rc = bench_module("random_checkpoint")
    path = rc.write_random_checkpoint(tmp_path / "ckpt", "tiny", layers=3, layers_per_shard=2, dtype=torch.float32)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]  # embed, blocks 0-1, block 2, head
    assert sorted(p.name for p in path.iterdir()) == sorted(files + ["config.json", "model.safetensors.index.json"])
    ours = load_model(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert index["metadata"]["total_size"] == 4 * ours.num_parameters()
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
    # the same seed and names draw the same values: a rerun writes the same checkpoint
    again = load_model(rc.write_random_checkpoint(tmp_path / "again", "tiny", layers=3, dtype=torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_qlora_benchmark_smoke_runs_minitune_beside_bitsandbytes_on_cpu(tmp_path):
    bench = bench_module("bench_qlora_gpu")
    out = tmp_path / "qlora.json"
    result = bench.main(["--smoke", "--ckpt", str(tmp_path / "ckpt"), "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] and saved["machine"]["torch"] == torch.__version__
    row = saved["rows"][0]
    ours = row["minitune"]
    assert len(ours["losses"]) == 3 and all(math.isfinite(x) for x in ours["losses"])
    assert abs(ours["losses"][0] - math.log(320)) < 1.0  # a random model: about log(vocab)
    assert row["estimate_bytes"] > 0 and "qlora" in row["estimate"]
    if result["hf_skipped"] is None:  # bitsandbytes runs on this CPU: the comparison was made
        assert row["losses_match"], (ours["losses"], row["transformers+peft+bnb"]["losses"])


def test_rl_split_benchmark_smoke_splits_ppo_and_grpo_steps_on_cpu(tmp_path):
    bench = bench_module("bench_rl_split_gpu")
    out = tmp_path / "rl.json"
    bench.main(["--smoke", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["algo"], r["decode"]) for r in rows] == [("ppo", "plain"), ("ppo", "static"),
                                                        ("grpo", "plain"), ("grpo", "static")]
    for r in rows:
        assert r["median_generation_s"] > 0 and r["median_scoring_s"] > 0 and r["median_training_s"] > 0
        assert abs(r["share_generation"] + r["share_scoring"] + r["share_training"] - 1) < 1e-9
