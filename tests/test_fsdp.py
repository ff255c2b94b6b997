"""FSDP (ZeRO-3 full_shard, ZeRO-2 shard_grad_op) on 2 CPU processes (gloo) takes the steps of one process
with the same global batch; sharded checkpoints resume the run; the gathered model loads in transformers;
each rank holds ~1/2 of the parameter + optimizer bytes; fsdp / deepspeed settings that cannot work are
one clear error.

One spawn of 2 processes runs every sharded case in a row (starting processes and importing torch is
the slow part): ~15-30 s on 2 busy cores.
"""

import json
import os

import pytest
import torch
from ranks import copy_checkpoint, keys_to_int, on_ranks
from test_trainer import tiny_model, toy_data

from minitune import memory
from minitune.model import save_pretrained
from minitune.peft.lora import apply_lora
from minitune.train import TrainConfig, TrainConfigError, load_config, train
from minitune.train import fsdp
from minitune.train.checkpoint import CheckpointError, load_checkpoint

STEPS = 4
TOL = 1e-5  # losses of the sharded run vs one process: the same sums in another order (float32 rounding)
# (name, finetuning, fsdp option, per-device batch, accumulation): 2 ranks x 2 x 1 or 2 x 1 x 2 = global 4
CASES = [("full_zero3", "full", "full_shard", 2, 1), ("full_zero2", "full", "shard_grad_op", 1, 2),
         ("lora_zero3", "lora", "full_shard", 2, 1), ("lora_zero2", "lora", "shard_grad_op offload", 1, 2)]


def setup_model(finetuning: str, seed: int = 0):
    model = tiny_model(seed)
    if finetuning == "lora":
        torch.manual_seed(5)  # LoRA's A is drawn here: the same in every process
        apply_lora(model, r=4, alpha=8, targets="all-linear")
    return model


def config(batch: int, accum: int = 1, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(learning_rate=3e-3, max_steps=STEPS, per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accum, warmup_ratio=0.25, weight_decay=0.1,
                                 logging_steps=1, save_steps=0, device="cpu", seed=3), **kw})


def flat(model) -> list[float]:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()


def worker(rank: int, out: str) -> dict:
    got = {}
    for name, ft, option, batch, accum in CASES:
        model = setup_model(ft)
        save = dict(output_dir=os.path.join(out, "a"), save_steps=2) if name == "full_zero3" else {}
        result = train(model, toy_data(20), config(batch, accum, fsdp=option, finetuning_type=ft, **save))
        got[name] = {"losses": result.losses, "state_bytes": result.state_bytes, "params": flat(model)}
        if name == "full_zero3" and rank == 0:
            save_pretrained(model, None, os.path.join(out, "final"))
    # bf16: FSDP's mixed precision (bf16 copies for compute, fp32 shards and reduction)
    model = setup_model("full")
    result = train(model, toy_data(20), config(2, fsdp="full_shard", bf16=True))
    got["full_zero3_bf16"] = {"losses": result.losses, "dtypes": sorted({str(p.dtype) for p in model.parameters()})}
    # resume: checkpoint-2 of the first run, alone in a new folder, continues to the same steps 3 and 4
    result = train(setup_model("full", seed=99), toy_data(20),
                   config(2, fsdp="full_shard", output_dir=copy_checkpoint(rank, out), save_steps=2, resume=True))
    got["resumed"] = {"losses": result.losses}
    return got


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fsdp")
    single = {"bf16": {"losses": train(setup_model("full"), toy_data(20), config(4, bf16=True)).losses}}
    for ft in ("full", "lora"):
        model = setup_model(ft)
        result = train(model, toy_data(20), config(4, finetuning_type=ft))
        single[ft] = {"losses": result.losses, "state_bytes": result.state_bytes, "params": flat(model),
                      "model": model}
    ranks = on_ranks(worker, out)
    for got in ranks:
        for case in got.values():
            case["losses"] = keys_to_int(case["losses"])
    return single, ranks, out


@pytest.mark.slow
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_sharded_losses_match_one_process_with_the_same_global_batch(runs, name):
    single, ranks, _ = runs
    ref = single[name.split("_")[0]]
    for got in ranks:
        losses = got[name]["losses"]
        assert sorted(losses) == list(range(1, STEPS + 1))
        for step, loss in ref["losses"].items():
            assert losses[step] == pytest.approx(loss, abs=TOL)
        # the gathered weights on every rank are the single process's (AdamW magnifies float noise, as in test_ddp)
        assert torch.allclose(torch.tensor(got[name]["params"]), torch.tensor(ref["params"]), atol=1e-4)


@pytest.mark.slow
def test_bf16_computes_in_bfloat16_over_fp32_shards(runs):
    single, ranks, _ = runs
    for got in ranks:
        run = got["full_zero3_bf16"]
        assert run["dtypes"] == ["torch.float32"]  # the gathered master weights
        # one process autocasts with fp32 norm weights, FSDP casts every weight to bf16: bf16 rounding apart
        for step, loss in single["bf16"]["losses"].items():
            assert run["losses"][step] == pytest.approx(loss, abs=2e-2)


@pytest.mark.slow
def test_resume_from_a_sharded_checkpoint_reproduces_the_run(runs):
    _, ranks, out = runs
    ckpt = out / "a" / "checkpoint-2"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "optimizer-rank0-of-2.pt", "optimizer-rank1-of-2.pt", "shard-rank0-of-2.safetensors",
        "shard-rank1-of-2.safetensors", "trainer_state.json", "trainer_state.pt"]
    assert not [p for p in (out / "a").iterdir() if p.name.startswith(".")]  # no temporary folder left
    for got in ranks:
        assert sorted(got["resumed"]["losses"]) == [3, 4]
        for step in (3, 4):
            assert got["resumed"]["losses"][step] == pytest.approx(got["full_zero3"]["losses"][step], abs=1e-6)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_only_with_the_processes_that_wrote_it(runs):
    _, _, out = runs
    ckpt = out / "a" / "checkpoint-2"
    model = tiny_model()
    with pytest.raises(CheckpointError, match="written by 2 FSDP processes, now 1"):
        fsdp.load_sharded(ckpt, model, None, None, None)
    with pytest.raises(CheckpointError, match="a sharded checkpoint .* same fsdp setting and number of processes"):
        load_checkpoint(ckpt, model, None, None, None)


@pytest.mark.slow
def test_the_gathered_model_loads_in_transformers_with_the_same_logits(runs):
    transformers = pytest.importorskip("transformers")
    single, _, out = runs
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = torch.tensor([toy_data(1)[0]["input_ids"]])
    with torch.no_grad():
        want = single["full"]["model"].eval()(ids)
        got = hf(ids).logits
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full_zero3", "full_zero2", "lora_zero3"])
def test_each_rank_holds_half_the_parameter_and_optimizer_bytes(runs, name):
    single, ranks, _ = runs
    ft = name.split("_")[0]
    whole = single[ft]["state_bytes"]
    model = single[ft]["model"]
    est = memory.estimate_memory(model.config, method=ft, lora_r=4)
    # one process: the estimate's weights + AdamW moments, up to AdamW's step counters (4 bytes per tensor)
    assert whole == pytest.approx(est.parameters + est.optimizer_states, rel=0.01)
    # the per-rank formula for zero3; shard_grad_op reshards after backward too, so between steps it holds
    # the same 1/2 (its whole weights exist only from forward to backward). Dim 0 of an odd size splits
    # unevenly (61 embedding rows: 31 + 30): 5% tolerance
    per_rank = memory.per_rank_memory(est, 2, "zero3")
    for got in ranks:
        assert got[name]["state_bytes"] == pytest.approx(per_rank.parameters + per_rank.optimizer_states, rel=0.05)
    assert sum(got[name]["state_bytes"] for got in ranks) == pytest.approx(whole, rel=0.01)


def test_per_rank_memory_divides_what_each_zero_stage_shards():
    est = memory.estimate_memory(tiny_model().config, "full")
    p, g, s = est.parameters, est.gradients, est.optimizer_states
    rows = {k: memory.per_rank_memory(est, 4, k) for k in memory.STRATEGIES}
    assert (rows["ddp"].parameters, rows["ddp"].gradients, rows["ddp"].optimizer_states) == (p, g, s)
    assert (rows["zero1"].parameters, rows["zero1"].gradients, rows["zero1"].optimizer_states) == (p, g, s / 4)
    assert (rows["zero2"].parameters, rows["zero2"].gradients, rows["zero2"].optimizer_states) == (p, g / 4, s / 4)
    assert (rows["zero3"].parameters, rows["zero3"].gradients, rows["zero3"].optimizer_states) == (p / 4, g / 4, s / 4)
    assert rows["offload"].cpu == (p + g + s) / 4 and rows["offload"].total == est.activations
    assert "zero3" in memory.per_rank_table(est, 4)


@pytest.mark.parametrize("value,expected", [
    ("full_shard", fsdp.Sharding(True)), ("shard_grad_op", fsdp.Sharding(False)),
    ("full_shard offload", fsdp.Sharding(True, True)),
    (["shard_grad_op", "offload", "auto_wrap"], fsdp.Sharding(False, True)),
    ("", None), (None, None)])
def test_fsdp_options_are_hf_training_arguments_names(value, expected):
    assert fsdp.parse_fsdp(value) == expected


@pytest.mark.parametrize("value,says", [("full_shards", "unknown option 'full_shards'"),
                                        ("hybrid_shard", "not implemented"), ("offload", "add full_shard"),
                                        ("full_shard shard_grad_op", "pick one")])
def test_a_bad_fsdp_option_is_a_config_error(tmp_path, value, says):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"fsdp: {value}\n")
    with pytest.raises(TrainConfigError, match=f"{cfg}: fsdp: .*{says}"):
        load_config(cfg)


def write_ds(tmp_path, text: str):
    ds = tmp_path / "ds.json"
    ds.write_text(text)
    return ds


@pytest.mark.parametrize("zero,option", [
    ({"stage": 3}, "full_shard"), ({"stage": 2}, "shard_grad_op"),
    ({"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}, "full_shard offload"),
    ({"stage": 2, "offload_optimizer": {"device": "none"}}, "shard_grad_op"), ({"stage": 0}, None)])
def test_a_deepspeed_config_runs_as_the_equivalent_fsdp_option(tmp_path, capsys, zero, option):
    # LLaMA-Factory's ds_z3_config.json: "auto" values and the rest are not read
    ds = write_ds(tmp_path, json.dumps({"train_batch_size": "auto",
                                        "zero_optimization": {**zero, "overlap_comm": True}}))
    cfg = TrainConfig(deepspeed=str(ds), device="cpu", max_steps=1, per_device_train_batch_size=2, save_steps=0)
    assert cfg.fsdp == option
    cfg.validate()  # again (load_config validates twice): the option it set agrees with the file
    train(tiny_model(), toy_data(4), cfg)
    err = "".join(capsys.readouterr())
    assert f"note: deepspeed {ds}: ZeRO stage {zero['stage']}" in err
    if option:
        assert f"runs as fsdp {option!r}" in err and "is not sharding" in err


@pytest.mark.parametrize("text,says", [
    (None, "no such file"), ("{not json", ":1: not valid JSON"),
    ('{"zero_optimization": {"stage": 1}}', "ZeRO stage 1 .* has no FSDP equivalent"),
    ('{"zero_optimization": {"stage": "3"}}', "stage must be 0, 1, 2 or 3, got '3'")])
def test_a_bad_deepspeed_file_is_a_config_error(tmp_path, text, says):
    ds = tmp_path / "ds.json"
    if text is not None:
        ds.write_text(text)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"deepspeed: {ds}\n")
    with pytest.raises(TrainConfigError, match=f"{cfg}: deepspeed: {ds}.*{says}"):
        load_config(cfg)


def test_an_unreadable_deepspeed_file_is_a_config_error(tmp_path):
    with pytest.raises(TrainConfigError, match="deepspeed: .*cannot be read"):
        TrainConfig(deepspeed=str(tmp_path))  # a folder: IsADirectoryError


@pytest.mark.parametrize("kw,says", [
    (dict(fsdp="full_shard", finetuning_type="prefix"), "full, freeze or lora; not yet prefix"),
    (dict(fsdp="full_shard", stage="ppo", finetuning_type="qlora"), "not yet qlora"),
    (dict(fsdp="full_shard", fp16=True), "use bf16"),
    (dict(fsdp="full_shard", finetuning_type="lora", trainable_tokens="1,2"), "trainable_tokens"),
    (dict(fsdp="shard_grad_op", deepspeed="DS"), "disagree")])
def test_what_sharding_does_not_cover_is_refused(tmp_path, kw, says):
    if kw.get("deepspeed"):
        kw["deepspeed"] = str(write_ds(tmp_path, '{"zero_optimization": {"stage": 3}}'))
    with pytest.raises(TrainConfigError, match=says):
        TrainConfig(**kw)
