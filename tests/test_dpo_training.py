"""The DPO loop (lesson 12): sequence log-probs count response tokens only, training lowers the loss
and raises the chosen-vs-rejected margin, the precomputed reference log-probs are those of the model
before training (full or LoRA), the LoRA-off reference equals the precomputed one, the KL estimate is
0 at the start, `minitune train --stage dpo` runs, and lesson 12's --fast mode runs."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minitune
from minitune.cli import main
from minitune.data import IGNORE_INDEX
from minitune.peft import apply_lora
from minitune.rlhf import (PairCollator, add_reference_logps, dpo_loss, dpo_loss_fn, policy_logps, prepare_pairs,
                           response_kl, stack_pairs, train_dpo)
from minitune.train import TrainConfig, TrainConfigError
from rlhf_fixtures import fresh_model, pair_world
from test_lesson_sections import assert_sections_printed  # tests/ is on sys.path under pytest

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = torch.randint(0, 10, (2,), generator=g).tolist()
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": f"{a + b}"})
    return rows


@pytest.fixture(scope="module")
def tiny():
    return pair_world(synthetic_pairs(60, seed=9))


def train_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(stage="dpo", learning_rate=3e-3, max_steps=20, per_device_train_batch_size=8, logging_steps=1,
                save_steps=0, device="cpu", seed=0, output_dir=str(tmp_path), pref_beta=0.5)
    return TrainConfig(**{**base, **kw})


def test_sequence_logps_sum_response_tokens_only(tiny):
    cfg, tok = tiny
    model = fresh_model(cfg).eval()
    feats = prepare_pairs(synthetic_pairs(4), tok).train
    batch = PairCollator(tok)(feats)
    with torch.no_grad():
        chosen, rejected = policy_logps(model, batch)
        ids, mask, labels = stack_pairs(batch)
        logp = F.log_softmax(model(ids, attention_mask=mask).float(), -1)
    for row, got in enumerate(torch.cat([chosen, rejected])):
        # by hand: position t predicts token t+1; only the reply tokens (label != -100) count
        want = sum(logp[row, t, ids[row, t + 1]] for t in range(ids.shape[1] - 1) if labels[row, t + 1] != IGNORE_INDEX)
        assert got.item() == pytest.approx(float(want), abs=1e-4)
    # the prompt really is left out: counting it too gives a different (lower) number
    with torch.no_grad():
        everything = dict(batch, chosen_labels=torch.where(batch["chosen_attention_mask"].bool(),
                                                           batch["chosen_input_ids"], IGNORE_INDEX))
        assert (policy_logps(model, everything)[0] < chosen - 1.0).all()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loop_lowers_the_loss_and_raises_the_margin(tiny, tmp_path, loss_type):
    cfg, tok = tiny
    data = prepare_pairs(synthetic_pairs(48), tok, val_size=8, seed=0)
    model = fresh_model(cfg)
    result = train_dpo(model, data, train_cfg(tmp_path, pref_loss=loss_type, max_steps=12), tok)
    losses = list(result.losses.values())
    first, last = result.metrics[1], result.metrics[12]
    assert sum(losses[-3:]) / 3 < losses[0], losses
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # step 1: the policy is the reference
    # (IPO aims the unscaled margin at 1 / (2 beta), i.e. a reward margin of 0.5 here, and stops there)
    assert last["rewards/margins"] > 0.25 and last["rewards/accuracies"] >= 0.75, last
    assert result.eval_metrics[12]["rewards/margins"] > 0
    records = [json.loads(x) for x in (tmp_path / "trainer_log.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(records[0])


def test_label_smoothing_changes_the_loss_as_conservative_dpo(tiny, tmp_path):
    cfg, tok = tiny
    feats = add_reference_logps(fresh_model(cfg, seed=1), prepare_pairs(synthetic_pairs(8), tok).train, tok)
    batch = PairCollator(tok)(feats)
    model = fresh_model(cfg)
    plain, _, _ = dpo_loss_fn(beta=0.5)(model, batch)
    smooth, _, _ = dpo_loss_fn(beta=0.5, label_smoothing=0.2)(model, batch)
    pc, pr = policy_logps(model, batch)
    m = 0.5 * ((pc - batch["ref_chosen_logps"]) - (pr - batch["ref_rejected_logps"]))
    want = (-0.8 * F.logsigmoid(m) - 0.2 * F.logsigmoid(-m)).mean()
    assert smooth.item() == pytest.approx(want.item(), rel=1e-5) and smooth.item() != pytest.approx(plain.item())


def test_precomputed_reference_is_the_model_before_training(tiny, tmp_path):
    cfg, tok = tiny
    data = prepare_pairs(synthetic_pairs(24), tok)
    model = fresh_model(cfg)
    before = copy.deepcopy(model)
    train_dpo(model, data, train_cfg(tmp_path, max_steps=5), tok)
    again = add_reference_logps(before, data.train, tok)  # the untouched starting model
    moved = add_reference_logps(model, data.train, tok)  # the trained one
    ref = add_reference_logps(fresh_model(cfg), data.train, tok)
    for a, r, m in zip(again, ref, moved):
        assert a["ref_chosen_logps"] == pytest.approx(r["ref_chosen_logps"], abs=1e-5)
    assert any(abs(m["ref_chosen_logps"] - r["ref_chosen_logps"]) > 1e-2 for m, r in zip(moved, ref))
    assert all(torch.equal(p, q) for p, q in zip(before.parameters(), fresh_model(cfg).parameters()))


def test_lora_reference_is_the_adapter_switched_off_and_unchanged_by_training(tiny, tmp_path):
    cfg, tok = tiny
    data = prepare_pairs(synthetic_pairs(24), tok)
    base_ref = add_reference_logps(fresh_model(cfg), data.train, tok)
    model = apply_lora(fresh_model(cfg), r=4, alpha=8, targets="all-linear")
    result = train_dpo(model, data, train_cfg(tmp_path, max_steps=8, learning_rate=1e-2), tok)
    assert result.metrics[8]["rewards/margins"] > 0
    after = add_reference_logps(model, data.train, tok)  # LoRA off: still the base model
    for a, b in zip(after, base_ref):
        assert a["ref_chosen_logps"] == pytest.approx(b["ref_chosen_logps"], abs=1e-4)
        assert a["ref_rejected_logps"] == pytest.approx(b["ref_rejected_logps"], abs=1e-4)
    # the on-the-fly reference (no ref_* in the batch) gives the same loss as the precomputed one
    batch = PairCollator(tok)(after[:8])
    on_the_fly = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    loss_pre, _, _ = dpo_loss_fn(beta=0.5)(model, batch)
    loss_fly, _, _ = dpo_loss_fn(beta=0.5)(model, on_the_fly)
    assert loss_fly.item() == pytest.approx(loss_pre.item(), rel=1e-4)
    with pytest.raises(ValueError, match="add_reference_logps"):
        dpo_loss_fn()(fresh_model(cfg), on_the_fly)


def test_response_kl_is_zero_before_training_and_positive_after(tiny, tmp_path):
    cfg, tok = tiny
    stops, pad = [tok.eos_id], tok.eos_id
    prompts = [tok.encode(f"What is {a} plus 2?") for a in range(6)]
    model = apply_lora(fresh_model(cfg), r=4, alpha=8, targets="all-linear")
    start = response_kl(model, None, prompts, stops, pad, max_new_tokens=8)
    assert start["kl_per_token"] == pytest.approx(0.0, abs=1e-5) and start["tokens"] > 0
    data = prepare_pairs(synthetic_pairs(24), tok)
    train_dpo(model, data, train_cfg(tmp_path, max_steps=8, learning_rate=1e-2), tok)
    end = response_kl(model, None, prompts, stops, pad, max_new_tokens=8)
    assert end["kl_per_token"] > 1e-3


def test_cli_train_stage_dpo_and_bad_pref_settings(tiny, tmp_path, capsys):
    cfg, tok = tiny
    model_dir = tmp_path / "model"
    minitune.save_pretrained(fresh_model(cfg), tok, model_dir)
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in synthetic_pairs(16)))
    args = ["train", "--stage", "dpo", "--model_name_or_path", str(model_dir), "--dataset",
            str(tmp_path / "pairs.jsonl"), "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "8",
            "--max_steps", "2", "--save_steps", "0", "--device", "cpu", "--pref_beta", "0.2", "--pref_loss", "hinge"]
    main(args)
    out = capsys.readouterr().out
    assert "dpo: trained 2 steps" in out and "rewards/margins" in out
    assert (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(SystemExit, match="pref_loss.*kto_pair"):
        main(args[:-1] + ["kto_pair"])
    with pytest.raises(TrainConfigError, match="dpo_label_smoothing"):
        TrainConfig(pref_loss="ipo", dpo_label_smoothing=0.1)


def test_dpo_loss_rewards_match_dpo_loss(tiny):
    """dpo_loss_fn's logged rewards are exactly dpo_loss's beta * log-ratios."""
    cfg, tok = tiny
    feats = add_reference_logps(fresh_model(cfg, seed=3), prepare_pairs(synthetic_pairs(8), tok).train, tok)
    batch = PairCollator(tok)(feats)
    model = fresh_model(cfg)
    _, n, metrics = dpo_loss_fn(beta=0.3)(model, batch)
    pc, pr = policy_logps(model, batch)
    _, cr, rr = dpo_loss(pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta=0.3)
    assert n == 8
    assert metrics["rewards/chosen"].item() == pytest.approx(cr.mean().item(), rel=1e-5)
    assert metrics["rewards/accuracies"].item() == pytest.approx((cr > rr).float().mean().item())


def test_lesson_12_fast_runs(tmp_path):
    need = [ROOT / "weights/tiny/config.json", ROOT / "weights/tiny/model.safetensors",
            ROOT / "weights/tiny/data/preference.jsonl", ROOT / "weights/tiny/data/sft_alpaca.jsonl"]
    missing = [str(p.relative_to(ROOT)) for p in need if not p.exists()]
    if missing:
        pytest.skip(f"weights/tiny has not landed yet (missing {', '.join(missing)})")
    proc = subprocess.run([sys.executable, "lessons/12-dpo/run.py", "--fast", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preferred behaviour" in proc.stdout and "KL" in proc.stdout and "lesson 12 finished" in proc.stdout
    assert_sections_printed("12-dpo", proc.stdout)
