"""Resumable PPO and GRPO (minitune/rlhf/rl_checkpoint.py): a run stopped after step k and resumed gives the
uninterrupted run's records and weights bit for bit; half-written checkpoints are never resumed from; a
checkpoint of another setup is an error naming its file."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from minitune.peft import apply_lora
from minitune.rlhf import GRPOConfig, PPOConfig, RewardModel, train_grpo, train_ppo
from minitune.rlhf import rl_checkpoint
from rlhf_fixtures import EOS, PAD, PROMPTS, target_rate, tiny

torch.set_num_threads(1)


def actor_and_reference(lora: bool):
    """The actor as the first run built it; a resumed run builds it again the same way."""
    if lora:  # dropout on the LoRA path draws from the global RNG: its state must be resumed too
        return apply_lora(tiny(), r=4, alpha=8, dropout=0.1, targets="all-linear"), None  # None: adapter off
    return tiny(), tiny()


def run(stage: str, lora: bool, steps: int, out, **kw):
    """(records, {name: trained weights}) of one call, fresh models each time, as after a restart."""
    actor, reference = actor_and_reference(lora)
    common = dict(steps=steps, batch_size=4, learning_rate=3e-3, max_new_tokens=4, warn=False, output_dir=str(out),
                  log_path=str(out / "log.jsonl"), **kw)
    if stage == "ppo":  # an adaptive KL coefficient moves every step: its value is part of the state
        critic = RewardModel(tiny(1))
        cfg = PPOConfig(mini_batch_size=2, ppo_epochs=2, adap_kl_ctrl=True, init_kl_coef=0.1, target_kl=0.01,
                        horizon=10, **common)
        records = train_ppo(actor, critic, reference, target_rate, PROMPTS, cfg, [EOS], PAD)
        models = {"actor": actor, "critic": critic}
    else:
        cfg = GRPOConfig(num_generations=2, mini_batch_size=4, num_iterations=2, **common)
        records = train_grpo(actor, reference, target_rate, PROMPTS, cfg, [EOS], PAD)
        models = {"actor": actor}
    return records, {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}


def without_clock(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_a_run_stopped_and_resumed_equals_the_uninterrupted_run(stage, lora, tmp_path):
    full_records, full_weights = run(stage, lora, 4, tmp_path / "whole")
    run(stage, lora, 2, tmp_path / "split", save_steps=2)  # "stopped" after step 2
    assert (tmp_path / "split/checkpoint-2/trainer_state.json").exists()
    records, weights = run(stage, lora, 4, tmp_path / "split", save_steps=2, resume=True)

    assert without_clock(records) == without_clock(full_records)  # every float bit for bit
    for name, state in full_weights.items():
        assert all(torch.equal(v, weights[name][k]) for k, v in state.items()), name
    logged = [json.loads(x) for x in (tmp_path / "split/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # each step once: the resumed run rewrote the first two
    assert without_clock(logged) == without_clock(records)
    assert (tmp_path / "split/checkpoint-4").is_dir()
    if stage == "ppo":  # the state resumed was not a constant
        assert records[2]["kl_coef"] != records[0]["kl_coef"]


def test_a_half_written_checkpoint_folder_is_ignored(tmp_path, capsys):
    run("grpo", True, 2, tmp_path, save_steps=1)
    # a crash while checkpoint-3 was being written leaves its hidden temporary folder behind, complete-looking
    (tmp_path / ".checkpoint-3.tmp-12345").mkdir()
    for f in (tmp_path / "checkpoint-2").iterdir():
        (tmp_path / ".checkpoint-3.tmp-12345" / f.name).write_bytes(b"half")
    records, _ = run("grpo", True, 3, tmp_path, save_steps=1, resume=True)
    assert f"resume: continuing from {tmp_path / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert [r["step"] for r in records] == [1, 2, 3]


def test_a_crash_while_saving_leaves_no_checkpoint(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing trainer_state.pt")

    monkeypatch.setattr(rl_checkpoint.torch, "save", crash)  # after the weights are written
    with pytest.raises(KeyboardInterrupt):
        run("grpo", False, 1, tmp_path, save_steps=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]  # no checkpoint-1, no temporary folder


def test_resume_without_a_checkpoint_starts_from_step_0(tmp_path, capsys):
    records, _ = run("grpo", False, 1, tmp_path, resume=True)
    assert "resume: no checkpoint in" in capsys.readouterr().out and [r["step"] for r in records] == [1]


def test_resuming_a_checkpoint_of_another_setup_is_an_error_naming_the_file(tmp_path):
    run("grpo", False, 1, tmp_path, save_steps=1)  # a full actor
    with pytest.raises(ValueError, match=r"checkpoint-1/actor\.safetensors: its tensors are not this model's"):
        run("grpo", True, 2, tmp_path, resume=True)  # a LoRA actor
    with pytest.raises(ValueError, match=r"checkpoint-1/critic\.safetensors: not found"):
        run("ppo", False, 2, tmp_path, resume=True)  # PPO from a GRPO checkpoint: no critic


def test_checkpoints_need_an_output_dir():
    with pytest.raises(ValueError, match="need an output_dir"):
        PPOConfig(save_steps=1)
    with pytest.raises(ValueError, match="need an output_dir"):
        GRPOConfig(resume=True)


def test_checkpoint_holds_the_states_a_step_reads(tmp_path):
    run("ppo", True, 1, tmp_path, save_steps=1)
    ckpt = tmp_path / "checkpoint-1"
    assert sorted(p.name for p in ckpt.iterdir()) == ["actor.safetensors", "critic.safetensors", "trainer_state.json",
                                                      "trainer_state.pt"]
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # nothing in it runs
    assert {"global_step", "optimizers", "kl_coef", "generator", "rng", "records"} <= set(state)
    assert set(state["optimizers"]) == {"actor", "critic"} and len(state["records"]) == 1
    assert json.loads((ckpt / "trainer_state.json").read_text()) == {"global_step": 1}
    lora_only = load_file(ckpt / "actor.safetensors")
    assert lora_only and all("lora_" in k for k in lora_only)  # only what trains
