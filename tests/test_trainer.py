"""The training loop: resume reproduces the uninterrupted run, accumulation equals the big batch,
NaN stops naming the step, fp16 skips are reported, no decay on norms/biases, log and PNG
written, and config files/flags are checked with the file and key named."""

import json
import struct
import zlib

import pytest
import torch

from minitune.model import ModelConfig, Transformer
from minitune.train import TrainConfig, TrainConfigError, load_config, param_groups, train
from minitune.train.checkpoint import last_checkpoint

torch.set_num_threads(1)  # the tests share 2 cores; tiny models gain nothing from threads


def tiny_model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2), **kw})
    return Transformer(cfg)


def toy_data(n=24, vocab=61, seed=1) -> list[dict]:
    """Examples of different lengths with a masked prompt, so token weighting matters."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (4 + (i * 5) % 11,), generator=g).tolist()
        k = 1 + i % 3
        out.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
    return out


def cfg(**kw) -> TrainConfig:
    base = dict(learning_rate=3e-3, max_steps=6, per_device_train_batch_size=4, logging_steps=1,
                save_steps=0, device="cpu", seed=7)
    return TrainConfig(**{**base, **kw})


class Faulty:
    """A loss_fn that misbehaves on its `at`-th call: 'raise' (a crash), or multiplies by nan/inf."""

    def __init__(self, at, what):
        self.calls, self.at, self.what = 0, at, what

    def __call__(self, model, batch):
        from minitune.train import causal_lm_loss

        self.calls += 1
        loss, n = causal_lm_loss(model, batch)
        if self.calls == self.at:
            if self.what == "raise":
                raise KeyboardInterrupt("simulated crash")
            loss = loss * float(self.what)
        return loss, n


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    # accumulation, warmup and weight decay, so optimizer/scheduler state all matter
    kw = dict(max_steps=8, per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_ratio=0.25,
              weight_decay=0.1, save_steps=4)
    full = train(tiny_model(), toy_data(), cfg(output_dir=str(tmp_path / "a"), **kw))
    with pytest.raises(KeyboardInterrupt):  # crash in step 5, after checkpoint-4 was written
        train(tiny_model(), toy_data(), cfg(output_dir=str(tmp_path / "b"), **kw), loss_fn=Faulty(4 * 2 + 1, "raise"))
    assert last_checkpoint(tmp_path / "b").name == "checkpoint-4"
    resumed = train(tiny_model(seed=99), toy_data(), cfg(output_dir=str(tmp_path / "b"), resume=True, **kw))
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert resumed.losses[step] == pytest.approx(full.losses[step], abs=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "trainer_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # history up to the checkpoint kept, nothing duplicated


def test_gradient_accumulation_equals_the_big_batch():
    # Step 1 starts from the same weights in every run, so its gradient is the sum the accumulation must
    # reproduce, up to float rounding. Later steps start from weights that already differ by rounding, and
    # AdamW (each gradient divided by its own running size) turns that into steps of up to lr where a
    # gradient is ~0 (k_proj's bias is exactly zero in exact arithmetic): a bound on the final weights
    # held on one CPU and failed on another. So after step 1 the losses are compared, not the weights.
    results = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        first = {}

        def keep(model, step, first=first):  # after_step sees the step's gradients before they are cleared
            if step == 1:
                first.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        r = train(tiny_model(), toy_data(), cfg(per_device_train_batch_size=batch, gradient_accumulation_steps=accum),
                  after_step=keep)
        results.append((r.losses, first))
    losses0, grads0 = results[0]
    for losses, grads in results[1:]:
        for step, loss in losses0.items():
            assert losses[step] == pytest.approx(loss, abs=1e-6)
        assert grads.keys() == grads0.keys()
        for name, g in grads0.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))


def test_nan_loss_stops_the_run_naming_the_step():
    with pytest.raises(FloatingPointError, match=r"step 3: the training loss is nan"):
        train(tiny_model(), toy_data(), cfg(), loss_fn=Faulty(3, "nan"))


def test_fp16_loss_scaler_skips_an_inf_step_and_says_so(tmp_path, capsys):
    r = train(tiny_model(), toy_data(), cfg(fp16=True, output_dir=str(tmp_path)), loss_fn=Faulty(3, "inf"))
    assert r.skipped_steps == [3] and r.global_step == 6
    captured = capsys.readouterr()
    assert "step 3: fp16 loss scaler skipped the update" in captured.out + captured.err
    records = [json.loads(line) for line in (tmp_path / "trainer_log.jsonl").read_text().splitlines()]
    assert any(rec.get("skipped") and rec["step"] == 3 for rec in records)


def test_frozen_parameters_do_not_change():
    model = tiny_model()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = model.model.embed_tokens.weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    train(model, toy_data(), cfg(max_steps=2))
    assert torch.equal(model.model.embed_tokens.weight, before)
    assert not torch.equal(model.lm_head.weight, head)


def test_no_weight_decay_on_norms_and_biases():
    model = tiny_model(model_type="qwen2")  # q/k/v biases
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    kept = {names[id(p)] for p in keep["params"]}
    assert kept == {n for n, p in model.named_parameters() if "norm" in n or n.endswith("bias")}
    assert any(n.endswith("q_proj.bias") for n in kept) and "model.norm.weight" in kept
    assert all(p.ndim == 2 for p in decay["params"])


def test_jsonl_log_and_png_are_written(tmp_path):
    r = train(tiny_model(), toy_data(), cfg(output_dir=str(tmp_path), plot_loss=True, eval_steps=3, save_steps=3),
              val_data=toy_data(6, seed=5))
    records = [json.loads(line) for line in (tmp_path / "trainer_log.jsonl").read_text().splitlines()]
    train_recs = [x for x in records if "loss" in x]
    assert [x["step"] for x in train_recs] == list(range(1, 7))
    assert set(train_recs[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"}
    assert [x["step"] for x in records if "eval_loss" in x] == [3, 6] and sorted(r.eval_losses) == [3, 6]
    assert (tmp_path / "checkpoint-3" / "model.safetensors").exists()
    assert (tmp_path / "checkpoint-6" / "trainer_state.pt").exists()
    png = (tmp_path / "training_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (640, 400)
    idat_len = struct.unpack(">I", png[33:37])[0]
    assert len(zlib.decompress(png[41:41 + idat_len])) == height * (1 + 3 * width)


def test_plot_names_its_quantity_at_the_top_left_and_nowhere_else(tmp_path):
    from minitune.train.plot import plot_losses

    def pixel_rows(label):
        png = plot_losses(tmp_path / f"{label}.png", [1, 2, 3], [0.5, 0.7, 0.6], label=label).read_bytes()
        width, height = struct.unpack(">II", png[16:24])
        raw = zlib.decompress(png[41:41 + struct.unpack(">I", png[33:37])[0]])
        return [raw[y * (1 + 3 * width):(y + 1) * (1 + 3 * width)] for y in range(height)]

    loss, reward = pixel_rows("loss"), pixel_rows("reward")
    assert loss[8:18] != reward[8:18]  # the label, in the top-left strip (RL stages: reward, kl)
    assert loss[:8] == reward[:8] and loss[18:] == reward[18:]  # the ticks and the curve do not depend on it


def test_few_trainable_parameters_checkpoint_only_those(tmp_path):
    model = tiny_model()
    for n, p in model.named_parameters():
        p.requires_grad_("norm" in n)
    train(model, toy_data(), cfg(max_steps=2, save_steps=2, output_dir=str(tmp_path)))
    files = {f.name for f in (tmp_path / "checkpoint-2").iterdir()}
    assert "trainable_params.safetensors" in files and "model.safetensors" not in files


def test_resuming_a_checkpoint_of_another_setup_is_an_error_naming_it_not_a_partial_load(tmp_path):
    model = tiny_model()
    for n, p in model.named_parameters():
        p.requires_grad_("norm" in n)
    train(model, toy_data(), cfg(max_steps=2, save_steps=2, output_dir=str(tmp_path)))  # only the norms saved
    wider = tiny_model(hidden_size=48)  # the norms again, of another shape; every weight trains
    with pytest.raises(ValueError, match=r"checkpoint-2: its tensors are not this model's .* trainable ones missing"
                                         r".* of another shape e\.g\. \['model\.layers\.0\.input_layernorm\.weight'"):
        train(wider, toy_data(), cfg(max_steps=4, save_steps=2, output_dir=str(tmp_path), resume=True))


# ----------------------------------------------------------------------------- the config


LF_YAML = """\
### model
model_name_or_path: weights/tiny
stage: sft             # LLaMA-Factory's own example layout
finetuning_type: full
dataset: a.json, b.json
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
eval_steps: null
do_train: true
report_to: none
"""


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_every_stage_accepts_resume(stage):
    """Every stage writes checkpoints now (PPO/GRPO: rlhf/rl_checkpoint.py, tests/test_rl_resume.py)."""
    assert TrainConfig(stage=stage, resume=True, output_dir="out").resume


def test_yaml_subset_json_and_flags(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(LF_YAML)
    load_config(tmp_path / "c.yaml")
    assert "ignoring do_train, report_to (no effect in minitune)" in capsys.readouterr().err
    with pytest.raises(TrainConfigError, match=r"command line \(--plot_loss\): plot_loss: needs an output_dir"):
        load_config(tmp_path / "c.yaml", {"plot_loss": "true"})
    c = load_config(tmp_path / "c.yaml", {"learning_rate": "2e-4", "plot_loss": "true", "output_dir": "out"})
    assert (c.learning_rate, c.bf16, c.plot_loss, c.warmup_ratio) == (2e-4, True, True, 0.1)
    assert c.datasets == ["a.json", "b.json"] and c.eval_steps is None
    (tmp_path / "c.json").write_text(json.dumps({"dataset": ["x.jsonl"], "max_steps": 5, "learning_rate": 1}))
    c = load_config(tmp_path / "c.json")
    assert c.datasets == ["x.jsonl"] and c.max_steps == 5 and c.learning_rate == 1.0
    (tmp_path / "l.yaml").write_text("dataset:\n  - one.json\n  - two.json\n")
    assert load_config(tmp_path / "l.yaml").datasets == ["one.json", "two.json"]


@pytest.mark.parametrize("text, message", [
    ("learnig_rate: 1e-4\n", r"c\.yaml: unknown key 'learnig_rate'; did you mean 'learning_rate'\?"),
    ("num_train_epochs: three\n", r"c\.yaml: num_train_epochs must be float, got 'three'"),
    ("bf16: 1\n", r"c\.yaml: bf16 must be bool, got 1"),
    ("bf16: true\nfp16: true\n", r"c\.yaml: bf16: bf16 and fp16 are both true"),
    ("lr_scheduler_type: cosin\n", r"c\.yaml: lr_scheduler_type: 'cosin' is not one of"),
    ("just some words\n", r"c\.yaml:1: expected `key: value`"),
])
def test_bad_config_names_the_file_and_key(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(TrainConfigError, match=message):
        load_config(tmp_path / "c.yaml")


def test_bad_flag_names_the_flag(tmp_path):
    with pytest.raises(TrainConfigError, match=r"command line \(--per_device_train_batch_size\): .* must be int"):
        load_config(None, {"per_device_train_batch_size": "2.5"})


def test_memory_estimate_counts_both_sequences_of_a_preference_pair():
    from minitune.train.trainer import _print_memory_estimate
    pairs = [{"chosen_input_ids": [3] * 10, "rejected_input_ids": [3] * 14}, {"chosen_input_ids": [3] * 12,
                                                                            "rejected_input_ids": [3] * 9}]
    est = _print_memory_estimate(tiny_model(), cfg(per_device_train_batch_size=4, cutoff_len=64), pairs)
    assert (est.batch_size, est.seq_len) == (8, 14)  # DPO runs chosen and rejected as 2B rows
    plain = _print_memory_estimate(tiny_model(), cfg(per_device_train_batch_size=4, cutoff_len=64), toy_data())
    assert plain.batch_size == 4
