"""Reward-model training (lesson 10): held-out reward accuracy rises on a small synthetic preference
task, bad pairs are dropped and counted, margins travel to the loss, scores ignore padding, the saved
RM loads back with the same scores, `minitune train --stage rm` runs, and lesson 10's --fast mode runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minitune
from minitune.cli import main
from minitune.rlhf import (PairCollator, RewardModel, load_reward_model, pairwise_loss, prepare_pairs,
                           reward_loss_fn, save_reward_model, score_pairs, train_reward_model)
from minitune.train import TrainConfig
from rlhf_fixtures import fresh_model, pair_world
from test_lesson_sections import assert_sections_printed  # tests/ is on sys.path under pytest

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Polite (ends with a full stop) beats curt (no full stop, sometimes rude): a rule a tiny RM can learn."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = torch.randint(0, 10, (2,), generator=g).tolist()
        ans = str(a + b)
        rude = bool(torch.randint(0, 2, (1,), generator=g))
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {ans}.",
                     "rejected": f"whatever {ans}" if rude else f"{ans}"})
    return rows


@pytest.fixture(scope="module")
def tiny():
    return pair_world(synthetic_pairs(60, seed=9))


def test_rm_training_raises_held_out_reward_accuracy(tiny, tmp_path):
    cfg, tok = tiny
    data = prepare_pairs(synthetic_pairs(160), tok, cutoff_len=64, val_size=40, seed=0)
    assert (data.report.train, data.report.val) == (120, 40)
    rm = RewardModel(fresh_model(cfg))
    before = score_pairs(rm, data.val, tok)["accuracy"]
    tc = TrainConfig(stage="rm", learning_rate=3e-3, max_steps=25, per_device_train_batch_size=16, logging_steps=5,
                     save_steps=0, device="cpu", seed=0, output_dir=str(tmp_path))
    result = train_reward_model(rm, data, tc, tok)
    after = score_pairs(rm, data.val, tok)
    assert after["accuracy"] >= 0.9 and after["accuracy"] > before, (before, after["accuracy"])
    assert after["margin"] > 0
    # the trainer's log carries the RM's accuracy beside the loss, and the held-out one at the end
    records = [json.loads(x) for x in (tmp_path / "trainer_log.jsonl").read_text().splitlines()]
    assert "accuracy" in records[0] and "margin" in records[0]
    assert records[-1]["eval_accuracy"] == pytest.approx(after["accuracy"])
    assert result.losses[25] < result.losses[1]


def test_bad_pairs_are_dropped_and_counted_with_their_record_number(tiny, tmp_path):
    cfg, tok = tiny
    good = synthetic_pairs(6)
    bad = [{"prompt": "What is 1 plus 1?", "chosen": "2.", "rejected": " 2. "},  # identical up to blanks
           {"prompt": "What is 1 plus 1?", "chosen": "2.", "rejected": "   "},  # empty response
           {"prompt": "What is 1 plus 1? " * 40, "chosen": "2.", "rejected": "3"},  # prompt fills the cutoff
           {"prompt": "What is 1 plus 1?", "chosen": "2."},  # not a pair
           {"prompt": "What is 1 plus 1?", "chosen": "The answer is 2. " * 20, "rejected": "3"}]  # kept, cut
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good + bad) + "\nnot json\n")
    data = prepare_pairs(path, tok, cutoff_len=48)
    r = data.report
    assert (r.records, r.identical, r.empty_response, r.prompt_too_long, r.bad_record) == (12, 1, 1, 1, 2)
    assert r.truncated == 1 and r.dropped == 5 and r.train == 7 and len(data.train) == 7
    assert r.notes[0].startswith("record 7:") and "same response" in r.notes[0]
    assert "identical chosen/rejected 1" in r.summary() and "prompt longer than cutoff 1" in r.summary()
    assert all(len(f["chosen_input_ids"]) <= 48 for f in data.train)


def test_per_pair_margin_reaches_the_pairwise_loss(tiny):
    cfg, tok = tiny
    rows = [dict(r, margin=float(i)) for i, r in enumerate(synthetic_pairs(4))]
    feats = prepare_pairs(rows, tok).train
    batch = PairCollator(tok)(feats)
    assert batch["margin"].tolist() == [0.0, 1.0, 2.0, 3.0]
    rm = RewardModel(fresh_model(cfg)).eval()
    scores = score_pairs(rm, feats, tok)
    loss, n, metrics = reward_loss_fn(margin=0.5)(rm, batch)
    expected = pairwise_loss(scores["chosen"], scores["rejected"], batch["margin"] + 0.5)
    assert n == 4 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["accuracy"].item() == pytest.approx(scores["accuracy"])


def test_scores_are_read_at_the_last_real_token_whatever_the_padding(tiny):
    cfg, tok = tiny
    feats = prepare_pairs(synthetic_pairs(8), tok).train
    rm = RewardModel(fresh_model(cfg)).eval()
    together = score_pairs(rm, feats, tok, batch_size=8)
    alone = [score_pairs(rm, [f], tok) for f in feats]
    assert torch.allclose(together["chosen"], torch.cat([a["chosen"] for a in alone]), atol=1e-5)
    assert torch.allclose(together["rejected"], torch.cat([a["rejected"] for a in alone]), atol=1e-5)


def test_saved_reward_model_loads_back_with_the_same_scores(tiny, tmp_path):
    cfg, tok = tiny
    feats = prepare_pairs(synthetic_pairs(8), tok).train
    rm = RewardModel(fresh_model(cfg))
    torch.nn.init.normal_(rm.value_head.bias)
    (tmp_path / "trainer_log.jsonl").write_text("{}\n")
    save_reward_model(rm, tok, tmp_path)
    assert (tmp_path / "trainer_log.jsonl").exists()  # saving beside a run's log keeps it
    rm2, tok2 = load_reward_model(tmp_path)
    assert torch.allclose(score_pairs(rm, feats, tok)["chosen"], score_pairs(rm2, feats, tok2)["chosen"], atol=1e-5)
    with pytest.raises(FileNotFoundError, match="value_head"):
        load_reward_model(tmp_path.parent)


def test_cli_train_stage_rm(tiny, tmp_path, capsys):
    cfg, tok = tiny
    model_dir = tmp_path / "model"
    minitune.save_pretrained(fresh_model(cfg), tok, model_dir)
    rows = synthetic_pairs(24) + [{"prompt": "hi", "chosen": "same.", "rejected": "same."}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "rm.yaml").write_text(f"stage: rm\nfinetuning_type: full\nmodel_name_or_path: {model_dir}\n"
                                      f"dataset: {tmp_path / 'pairs.jsonl'}\noutput_dir: {tmp_path / 'out'}\n"
                                      "per_device_train_batch_size: 8\nmax_steps: 2\nval_size: 8\nsave_steps: 0\n")
    main(["train", str(tmp_path / "rm.yaml"), "--device", "cpu", "--learning_rate", "1e-3"])
    out = capsys.readouterr().out
    assert "identical chosen/rejected 1" in out and "rm: trained 2 steps" in out and "eval_accuracy" in out
    rm, _ = load_reward_model(tmp_path / "out")
    assert isinstance(rm, RewardModel)


def tiny_world_ready() -> str | None:
    need = [ROOT / "weights/tiny/config.json", ROOT / "weights/tiny/model.safetensors",
            ROOT / "weights/tiny/data/preference.jsonl"]
    missing = [str(p.relative_to(ROOT)) for p in need if not p.exists()]
    return f"weights/tiny has not landed yet (missing {', '.join(missing)})" if missing else None


def test_lesson_10_fast_runs(tmp_path):
    reason = tiny_world_ready()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run([sys.executable, "lessons/10-reward-model/run.py", "--fast", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out reward accuracy" in proc.stdout and "lesson 10 finished" in proc.stdout
    assert_sections_printed("10-reward-model", proc.stdout)



def test_value_head_lands_on_the_backbones_device():
    """RewardModel(backbone) puts its head where the backbone is: with the head left on the CPU, lesson
    11 and `minitune train --stage rm` crashed on CUDA. The meta device stands in for a GPU here."""
    from rlhf_fixtures import CFG
    rm = RewardModel(fresh_model(CFG).to("meta"))
    assert {p.device.type for p in rm.parameters()} == {"meta"}
