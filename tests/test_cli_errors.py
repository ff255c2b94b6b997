"""The command line under bad input and faults: one `error:` line and exit code 2 for input the user can
fix (no traceback), a diverging fp16 run stops with exit code 1 and saves no model, an unknown
template fails before the model loads, Ctrl-C in chat leaves quietly."""

import json
import subprocess
import sys

import pytest
import torch

from test_cli import tiny_dir  # noqa: F401 (the fixture: a random tiny model with a BPE tokenizer)

from minitune.cli import main
from minitune.data.templates import TEMPLATES

torch.set_num_threads(1)


@pytest.fixture
def data(tmp_path):
    rows = [{"instruction": f"Say {w}", "output": f"{w} {w}"} for w in ("cat", "mat", "two", "four")] * 3
    (tmp_path / "data.json").write_text(json.dumps(rows))
    return tmp_path / "data.json"


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "minitune", *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)


def test_user_error_is_one_line_with_exit_code_2_and_no_traceback(tiny_dir, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "hi"}\n')  # no output
    proc = cli("train", "--model_name_or_path", tiny_dir, "--dataset", tmp_path / "bad.jsonl",
               "--output_dir", tmp_path / "out", "--max_steps", 1)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "bad.jsonl" in lines[0]


def test_unknown_template_in_train_fails_before_the_model_loads_and_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit) as e:  # the model path does not exist: it was never read
        main(["train", "--template", "qwen9", "--model_name_or_path", "/nowhere", "--dataset", "x.json",
              "--output_dir", "/nowhere/out"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown chat template 'qwen9'" in err and ", ".join(TEMPLATES) in err


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_unknown_template_in_chat_and_generate_fails_before_the_model_loads(command, capsys):
    extra = ["--prompt", "hi"] if command == "generate" else []
    with pytest.raises(SystemExit) as e:
        main([command, "--model", "/nowhere", "--template", "qwen9", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown chat template 'qwen9'") and "chatml" in err


@pytest.mark.parametrize("command", ["train", "chat"])
def test_help_lists_the_template_names(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert ", ".join(TEMPLATES) in " ".join(capsys.readouterr().out.split())  # argparse wraps the lines


def test_a_checkpoint_error_reaches_the_user_as_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path), "--prompt", "hi"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "config.json" in err


def test_fp16_run_that_diverges_stops_with_exit_code_1_and_saves_no_model(tiny_dir, data, tmp_path):
    out = tmp_path / "out"
    proc = cli("train", "--model_name_or_path", tiny_dir, "--dataset", data, "--output_dir", out, "--fp16",
               "--learning_rate", 30, "--max_steps", 20, "--per_device_train_batch_size", 2, "--device", "cpu",
               "--save_steps", 0)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1 and "the run diverged and stops, no model saved" in error[0]
    assert "Last good checkpoint: none" in error[0]
    assert not (out / "model.safetensors").exists() and "saved" not in proc.stdout
    log = [json.loads(ln) for ln in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert log[-1].get("stopped")


def test_ctrl_c_in_chat_exits_quietly_with_130(tiny_dir, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("minitune.chat.run_chat", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(tiny_dir)])
    assert e.value.code == 130
    assert "Traceback" not in capsys.readouterr().err


def test_cutoff_len_above_the_models_context_is_cut_to_it_with_a_note(tiny_dir, data, tmp_path, capsys):
    # the tiny test model's max_position_embeddings is ModelConfig's default; LLaMA-Factory's example
    # configs say cutoff_len 2048 whatever the model, so a config keeps working when the model changes
    main(["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(data), "--output_dir",
          str(tmp_path / "out"), "--cutoff_len", "1000000", "--max_steps", "1", "--save_steps", "0"])
    context = json.loads((tiny_dir / "config.json").read_text())["max_position_embeddings"]
    assert f"note: cutoff_len 1000000 is cut to {context}, the model's context" in capsys.readouterr().err
    assert (tmp_path / "out" / "trainer_log.jsonl").exists()


def test_a_missing_data_file_is_one_line_naming_it(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(tmp_path / "nothere.json"),
              "--output_dir", str(tmp_path / "out")])
    assert e.value.code == 2 and "nothere.json" in capsys.readouterr().err
