"""Safe under faults (train/checkpoint.py, train/output_dir.py, rlhf/rl_checkpoint.py): nothing in a
checkpoint runs; a run never writes into another run's output_dir unless told to resume it or to
overwrite it; the leftovers of a killed run are cleared; save_total_limit keeps the newest checkpoints;
a damaged newest checkpoint falls back to the one before it, naming the file."""

import json
import random
import re
from pathlib import Path

import pytest
import torch

from minitune.model import CheckpointError
from minitune.train import TrainConfigError, train
from test_cli import tiny_dir  # noqa: F401  (a fixture: a tiny model folder with a tokenizer)
from test_rl_resume import run as rl_run
from test_rl_resume import without_clock
from test_trainer import Faulty, cfg, tiny_model, toy_data

torch.set_num_threads(1)


class OpensAFile:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a crafted pickle could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_code(state_file: Path, marker: Path):
    torch.save({"global_step": 2, "rng": OpensAFile(marker)}, state_file)
    # it really names code to call (checked without running it)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(state_file) == ["io.open"]


def damage(file: Path, how: str):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if how == "truncated" else random.Random(0).randbytes(len(data)))


def few_trainable(model):
    for n, p in model.named_parameters():
        p.requires_grad_("norm" in n)  # checkpoints then hold trainable_params.safetensors only
    return model


# ----------------------------------------------------------------------------- nothing in a checkpoint runs


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_resume_refuses_a_pickle_that_would_run_code(stage, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "marker"
    if stage == "sft":
        train(tiny_model(), toy_data(), cfg(max_steps=2, save_steps=1, output_dir=str(out)))
    else:
        rl_run("grpo", False, 2, out, save_steps=1)
    plant_code(out / "checkpoint-2" / "trainer_state.pt", marker)
    # refused, not skipped for the complete checkpoint-1 beside it: a file naming code was put there on purpose
    with pytest.raises(CheckpointError, match=r"checkpoint-2/trainer_state\.pt: refusing to unpickle it: it would "
                                              r"import and call io\.open; minitune runs no code"):
        if stage == "sft":
            train(tiny_model(), toy_data(), cfg(max_steps=3, save_steps=1, output_dir=str(out), resume=True))
        else:
            rl_run("grpo", False, 3, out, save_steps=1, resume=True)
    assert not marker.exists()


# ----------------------------------------------------------------------------- one output_dir, one run


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_second_run_into_a_used_output_dir_stops_naming_it(stage, tmp_path):
    out = tmp_path / "out"
    first = (lambda: train(tiny_model(), toy_data(), cfg(max_steps=2, save_steps=2, output_dir=str(out)))) \
        if stage == "sft" else (lambda: rl_run("grpo", False, 2, out, save_steps=2))
    first()
    before = sorted(p.name for p in out.iterdir())
    expected = (rf"^{re.escape(str(out))}: holds another run's files \(checkpoint-2, .*\); set resume to continue "
                "that run, or overwrite_output_dir to delete them and start afresh")
    with pytest.raises(TrainConfigError, match=expected):
        first()
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched


def test_the_command_line_checks_the_output_dir_before_loading_the_model(tmp_path):
    from minitune.cli import run_train
    from minitune.train import TrainConfig

    (tmp_path / "trainer_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    for stage in ("sft", "dpo", "grpo"):  # the model folder does not exist: the folder check comes first
        with pytest.raises(TrainConfigError, match=rf"{re.escape(str(tmp_path))}: holds another run's files "
                                                   r"\(trainer_log\.jsonl\)"):
            run_train(TrainConfig(stage=stage, model_name_or_path=str(tmp_path / "no-model"), dataset="d.json",
                                  output_dir=str(tmp_path)))


def test_overwrite_output_dir_removes_the_old_run_first(tmp_path, capsys):
    out = tmp_path / "out"
    train(tiny_model(), toy_data(), cfg(max_steps=4, save_steps=2, output_dir=str(out), plot_loss=True))
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # an older LoRA run's final files
        (out / name).write_text("{}")
    (out / "notes.txt").write_text("mine")  # not a file minitune writes: left alone
    train(tiny_model(), toy_data(), cfg(max_steps=2, save_steps=1, output_dir=str(out), overwrite_output_dir=True))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "notes.txt", "trainer_log.jsonl"]
    assert [json.loads(x)["step"] for x in (out / "trainer_log.jsonl").read_text().splitlines()] == [1, 2]
    printed = capsys.readouterr().out
    assert f"overwrite_output_dir: removed the previous run's files from {out} (adapter_config.json" in printed


def test_resume_with_overwrite_output_dir_is_an_error(tmp_path):
    with pytest.raises(TrainConfigError, match="resume and overwrite_output_dir are both set: resume continues the "
                                               rf"run in {re.escape(str(tmp_path))}, overwrite_output_dir deletes it; "
                                               "set only one"):
        train(tiny_model(), toy_data(), cfg(output_dir=str(tmp_path), resume=True, overwrite_output_dir=True))


def test_overwrite_output_dir_never_deletes_the_model_it_starts_from(tiny_dir):  # noqa: F811
    from minitune.cli import run_train
    from minitune.train import TrainConfig

    with pytest.raises(TrainConfigError, match="is also model_name_or_path: overwrite_output_dir would delete"):
        run_train(TrainConfig(model_name_or_path=str(tiny_dir), dataset="d.json", output_dir=str(tiny_dir),
                              overwrite_output_dir=True))
    assert (tiny_dir / "model.safetensors").exists()


def test_leftover_temporary_folders_are_removed_at_start(tmp_path, capsys):
    train(tiny_model(), toy_data(), cfg(max_steps=2, save_steps=2, output_dir=str(tmp_path)))
    # a run killed while writing checkpoint-4, between the two renames of checkpoint-2, and in its final save
    for name in (".checkpoint-4.tmp-99999", ".checkpoint-2.old-12", ".final.tmp-77", "..final.tmp-77.tmp-77"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    result = train(tiny_model(), toy_data(), cfg(max_steps=3, save_steps=2, output_dir=str(tmp_path), resume=True))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert f"removed 4 unfinished temporary folder(s) that an interrupted run left in {tmp_path}" \
        in capsys.readouterr().out
    assert sorted(result.losses) == [3]


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_save_total_limit_keeps_the_newest_n(stage, tmp_path):
    if stage == "sft":
        train(tiny_model(), toy_data(), cfg(max_steps=5, save_steps=1, save_total_limit=2, output_dir=str(tmp_path)))
    else:
        rl_run("grpo", False, 3, tmp_path, save_steps=1, save_total_limit=2)
    kept = ["checkpoint-4", "checkpoint-5"] if stage == "sft" else ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == kept


def test_save_total_limit_never_keeps_a_damaged_newer_checkpoint_in_place_of_a_good_one(tmp_path):
    train(tiny_model(), toy_data(), cfg(max_steps=4, save_steps=2, output_dir=str(tmp_path)))
    damage(tmp_path / "checkpoint-4" / "model.safetensors", "truncated")
    with pytest.raises(KeyboardInterrupt):  # resumed from checkpoint-2, saved checkpoint-3, killed in step 5
        train(tiny_model(), toy_data(), cfg(max_steps=6, save_steps=3, save_total_limit=1, output_dir=str(tmp_path),
                                            resume=True), loss_fn=Faulty(3, "raise"))
    # checkpoint-3 is the newest good one; the damaged checkpoint-4 does not count as newer
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_save_total_limit_below_1_is_an_error(tmp_path):
    with pytest.raises(TrainConfigError, match="save_total_limit: must be >= 1 .*, got 0"):
        train(tiny_model(), toy_data(), cfg(save_total_limit=0, output_dir=str(tmp_path)))
    from minitune.rlhf import GRPOConfig

    with pytest.raises(ValueError, match="save_total_limit must be >= 1"):
        GRPOConfig(save_total_limit=-1)


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize("file,how", [("model.safetensors", "truncated"), ("trainable_params.safetensors", "garbage"),
                                      ("trainer_state.pt", "truncated"), ("trainer_state.pt", "garbage")])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(file, how, tmp_path, capsys):
    model = (few_trainable if file == "trainable_params.safetensors" else lambda m: m)
    kw = dict(max_steps=4, save_steps=2)
    whole = train(model(tiny_model()), toy_data(), cfg(output_dir=str(tmp_path / "whole"), **kw))
    damage(tmp_path / "whole" / "checkpoint-4" / file, how)
    resumed = train(model(tiny_model()), toy_data(), cfg(output_dir=str(tmp_path / "whole"), resume=True, **kw))
    printed = capsys.readouterr().out
    assert f"resume: {tmp_path / 'whole' / 'checkpoint-4' / file}: damaged" in printed
    assert f"resume: falling back to {tmp_path / 'whole' / 'checkpoint-2'}" in printed
    assert resumed.resumed_from.name == "checkpoint-2" and sorted(resumed.losses) == [3, 4]
    assert [resumed.losses[s] for s in (3, 4)] == pytest.approx([whole.losses[s] for s in (3, 4)], abs=1e-6)


def test_damaged_newest_rl_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    whole, _ = rl_run("grpo", False, 3, tmp_path, save_steps=1)
    damage(tmp_path / "checkpoint-3" / "actor.safetensors", "truncated")
    records, _ = rl_run("grpo", False, 3, tmp_path, save_steps=1, resume=True)
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'checkpoint-3' / 'actor.safetensors'}: damaged" in printed
    assert f"resume: continuing from {tmp_path / 'checkpoint-2'} at step 2" in printed
    assert without_clock(records) == without_clock(whole)


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_damaged_only_checkpoint_stops_naming_the_file(stage, tmp_path):
    if stage == "sft":
        train(tiny_model(), toy_data(), cfg(max_steps=2, save_steps=2, output_dir=str(tmp_path)))
        file = tmp_path / "checkpoint-2" / "model.safetensors"
    else:
        rl_run("grpo", False, 2, tmp_path, save_steps=2)
        file = tmp_path / "checkpoint-2" / "actor.safetensors"
    damage(file, "truncated")
    expected = (rf"^{re.escape(str(file))}: damaged, cannot be read \(.*\); {re.escape(str(tmp_path))} has no "
                "earlier complete checkpoint to fall back to")
    with pytest.raises(CheckpointError, match=expected):
        if stage == "sft":
            train(tiny_model(), toy_data(), cfg(max_steps=3, save_steps=2, output_dir=str(tmp_path), resume=True))
        else:
            rl_run("grpo", False, 3, tmp_path, save_steps=2, resume=True)


# ----------------------------------------------------------------------------- what a resumed run reports


def test_a_resumed_run_says_which_steps_it_trained(tiny_dir, tmp_path, capsys):  # noqa: F811
    from minitune.cli import run_train
    from minitune.train import TrainConfig

    data = [{"instruction": f"Say {w}", "output": f"{w} {w}"} for w in ("cat", "mat", "sat", "two")]
    (tmp_path / "data.json").write_text(json.dumps(data * 2))
    kw = dict(model_name_or_path=str(tiny_dir), dataset=str(tmp_path / "data.json"), per_device_train_batch_size=4,
              save_steps=2, output_dir=str(tmp_path / "out"), device="cpu")
    run_train(TrainConfig(max_steps=2, **kw))
    assert "trained 2 steps in" in capsys.readouterr().out
    run_train(TrainConfig(max_steps=5, resume=True, **kw))
    assert "trained 3 steps (steps 3-5, resumed from checkpoint-2) in" in capsys.readouterr().out
