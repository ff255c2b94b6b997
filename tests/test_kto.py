"""KTO (issue 20): the loss equals TRL's KTOTrainer on the same model outputs (desirable / undesirable weights,
the reference point z0 from mismatched pairs, clamped at 0); each example's mismatched pair is its prompt with
the previous example's reply; kto_en_demo-shaped data (dataset_info.json `kto_tag`, role/content tags) trains
through `minitune train` (full and LoRA) logging TRL's loss at every step; a record without a boolean label
stops the run naming the file and line. Tolerance: 1e-5 relative (a forward pass in each library)."""

import json
from types import SimpleNamespace

import pytest
import torch

import minitune
from minitune.cli import main
from minitune.data.kto import KTOCollator, KTOExample, prepare_kto
from minitune.data.dataset import tokenize_conversation
from minitune.rlhf import kto as kto_module
from minitune.rlhf import kto_loss, kto_loss_fn
from hf_factory import hf_model, write_checkpoint
from rlhf_fixtures import pair_world
from test_pref_family import synthetic_pairs, trl_trainer

from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402  (test_pref_family skips when trl is absent)
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

torch.set_num_threads(1)
FWD = 1e-5


class FusedHead(torch.nn.Module):
    """A minitune model behind the call TRL's KTO loss makes: model(..., labels=, fused_lm_head=True) with
    per-token log-probs of the labels (0 where a label is -100); the logging-only fields are zeros."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=True, use_cache=False, **_):
        logits = self.model(input_ids, attention_mask=attention_mask)[:, :-1].float()  # [B, T-1, V]
        targets = labels[:, 1:]
        mask = targets != -100
        logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_kto(model, batch, beta, desirable_weight=1.0, undesirable_weight=1.0):
    trainer = trl_trainer(KTOTrainer, model=model, beta=beta, desirable_weight=desirable_weight,
                          undesirable_weight=undesirable_weight, loss_type="kto", calculate_KL=True,
                          precompute_ref_logps=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long(), "KL_input_ids": batch["KL_input_ids"],
              "KL_attention_mask": batch["KL_attention_mask"], "KL_completion_mask": (batch["KL_labels"] != -100).long(),
              "label": batch["label"], "ref_logps": batch["ref_logps"], "ref_KL_logps": batch["ref_KL_logps"]}
    with torch.no_grad():
        return trainer._compute_loss(model, inputs, return_outputs=False), trainer._metrics


def kto_batch(n=6, seed=0, kl_shift=0.0, vocab=320):
    """Random prompt / reply token features, labels alternating, each with the previous reply as its mismatch."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()
    prompts = [ids(int(torch.randint(2, 6, (1,), generator=g))) for _ in range(n)]
    replies = [ids(int(torch.randint(1, 8, (1,), generator=g))) for _ in range(n)]
    feats = []
    for i, (p, r) in enumerate(zip(prompts, replies)):
        kl = replies[i - 1]
        feats.append({"input_ids": p + r, "labels": [-100] * len(p) + r, "label": i % 3 != 0,
                      "KL_input_ids": p + kl, "KL_labels": [-100] * len(p) + kl,
                      "ref_logps": float(-6 * len(r) + torch.randn(1, generator=g) * 3),
                      "ref_KL_logps": float(-6 * len(kl) + kl_shift)})
    return KTOCollator(pad_id=0)(feats)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    hf = write_checkpoint("qwen2", path)
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return hf, minitune.load_model(path, device="cpu", dtype=torch.float32).eval()


@pytest.mark.parametrize("kl_shift", [-200.0, 200.0])  # z0 clamped to 0 / z0 > 0
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.6)])
def test_kto_loss_equals_trls_kto_trainer(models, kl_shift, weights):
    hf, ours = models
    batch = kto_batch(kl_shift=kl_shift)
    want, trl_metrics = trl_kto(hf, batch, beta=0.2, desirable_weight=weights[0], undesirable_weight=weights[1])
    with torch.no_grad():
        got, n, metrics = kto_loss_fn(0.2, *weights)(ours, batch)
    assert n == 6 and got.item() == pytest.approx(want.item(), rel=FWD)
    mode = "eval" if not hf.training else "train"
    assert metrics["kl"].item() == pytest.approx(trl_metrics[mode]["kl"][-1], rel=FWD, abs=1e-6)
    assert (metrics["kl"].item() == 0.0) == (kl_shift > 0)  # a large reference KL log-prob: estimate < 0 -> 0
    assert metrics["rewards/chosen"].item() == pytest.approx(trl_metrics[mode]["rewards/chosen"][-1], rel=FWD)


def test_z0_carries_no_gradient_and_weights_scale_each_kind():
    logps = torch.tensor([-3.0, -4.0, -5.0], requires_grad=True)
    kl_logps = torch.tensor([-2.0, -2.0, -2.0], requires_grad=True)
    ref, desirable = torch.tensor([-3.5, -3.5, -3.5]), torch.tensor([True, False, True])
    loss, rewards, z0 = kto_loss(logps, ref, desirable, kl_logps, torch.full((3,), -3.0), beta=0.5,
                                 desirable_weight=2.0, undesirable_weight=0.5)
    loss.backward()
    assert kl_logps.grad is None and z0.item() == pytest.approx(1.0)
    r = torch.tensor([0.5, -0.5, -1.5])
    want = torch.stack([2.0 * (1 - torch.sigmoid(0.5 * (r[0] - 1))), 0.5 * (1 - torch.sigmoid(0.5 * (1 - r[1]))),
                        2.0 * (1 - torch.sigmoid(0.5 * (r[2] - 1)))]).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and torch.allclose(rewards, 0.5 * r)


# ----------------------------------------------------------------------------- data and minitune train


def kto_records(n=24) -> list[dict]:
    """The pairs split into unpaired labelled replies, in kto_en_demo's layout."""
    out = []
    for i, row in enumerate(synthetic_pairs(n)):
        reply, label = (row["chosen"], True) if i % 2 == 0 else (row["rejected"], False)
        out.append({"messages": [{"content": row["prompt"], "role": "user"},
                                 {"content": reply, "role": "assistant"}], "label": label})
    return out


KTO_INFO = {"kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                            "columns": {"messages": "messages", "kto_tag": "label"},
                            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                     "assistant_tag": "assistant"}}}


@pytest.fixture(scope="module")
def kto_dir(tmp_path_factory):
    """A transformers-written Qwen2 checkpoint + a data folder with kto_en_demo registered."""
    _, tok = pair_world(synthetic_pairs(32))
    root = tmp_path_factory.mktemp("kto")
    hf_model("qwen2", seed=2, vocab_size=tok.vocab_size).save_pretrained(root / "model")
    tok.save(root / "model")
    (root / "data").mkdir()
    (root / "data" / "dataset_info.json").write_text(json.dumps(KTO_INFO))
    (root / "data" / "kto_en_demo.json").write_text(json.dumps(kto_records(), indent=2))
    return root, tok


def test_each_example_is_mismatched_with_the_previous_reply(kto_dir):
    _, tok = kto_dir
    examples = [KTOExample([{"role": "user", "content": f"Question {i}?"}], f"Reply number {i}.", i % 2 == 0)
                for i in range(4)]
    data = prepare_kto(examples, tok, "chatml", cutoff_len=64)
    assert [f["label"] for f in data.train] == [True, False, True, False]
    for i, f in enumerate(data.train):
        want = tokenize_conversation(tok, "chatml", examples[i].prompt + [
            {"role": "assistant", "content": examples[i - 1].completion}])
        assert f["KL_input_ids"] == want["input_ids"] and f["KL_labels"] == want["labels"]
    assert data.desirable == 2 and data.undesirable == 2


def trl_kto_on(model, batch, cfg):
    return trl_kto(FusedHead(model), batch, cfg["pref_beta"], cfg["kto_chosen_weight"], cfg["kto_rejected_weight"])[0]


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_minitune_train_stage_kto_logs_trls_loss(kto_dir, tmp_path, monkeypatch, capsys, finetuning_type):
    root, _ = kto_dir
    settings = {"pref_beta": 0.3, "kto_chosen_weight": 1.2, "kto_rejected_weight": 0.8}
    made, seen = kto_module.kto_loss_fn, []

    def shadowed(*args):
        inner = made(*args)

        def loss_fn(model, batch):
            out = inner(model, batch)
            with torch.no_grad():
                seen.append((out[0].item(), trl_kto_on(model, batch, settings).item()))
            return out
        return loss_fn

    monkeypatch.setattr(kto_module, "kto_loss_fn", shadowed)
    main(["train", "--stage", "kto", "--finetuning_type", finetuning_type, "--model_name_or_path",
          str(root / "model"), "--dataset", "kto_en_demo", "--dataset_dir", str(root / "data"), "--output_dir",
          str(tmp_path / "out"), "--per_device_train_batch_size", "6", "--max_steps", "3", "--logging_steps", "1",
          "--save_steps", "0", "--learning_rate", "1e-2", "--device", "cpu", "--cutoff_len", "64",
          *[x for k, v in settings.items() for x in (f"--{k}", str(v))]])
    out = capsys.readouterr().out
    assert "12 desirable, 12 undesirable" in out and "kto: trained 3 steps" in out
    assert len(seen) == 3 and len({round(t, 6) for _, t in seen}) == 3
    for ours, trl in seen:
        assert ours == pytest.approx(trl, rel=FWD)
    assert (tmp_path / "out" / ("adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors")).exists()


def test_kto_record_without_boolean_label_names_file_and_line(kto_dir, tmp_path):
    root, _ = kto_dir
    records = kto_records(4)
    records[2]["label"] = "yes"
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps(KTO_INFO))
    (data / "kto_en_demo.json").write_text(json.dumps(records, indent=2))
    args = ["train", "--stage", "kto", "--model_name_or_path", str(root / "model"), "--dataset", "kto_en_demo",
            "--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        main(args)
    msg = str(e.value)
    assert "kto_en_demo.json line " in msg and "label 'yes'" in msg and "boolean label" in msg
    del records[1]["label"]
    (data / "kto_en_demo.json").write_text("\n".join(json.dumps(r) for r in records))  # JSONL: record 2 is line 2
    with pytest.raises(SystemExit, match=r"kto_en_demo.json line 2: no 'label' field"):
        main(args)
