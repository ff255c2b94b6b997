"""The preference family beside DPO (issue 20): ORPO, SimPO, IPO's per-token average, cDPO label smoothing
and LLaMA-Factory's pref_ftx SFT term, each equal to TRL's own loss code on the same log-probs or the same
model outputs; `minitune train` with pref_loss orpo / simpo (full and LoRA) on a transformers-written
checkpoint logs, step by step, the loss TRL computes on the same batches; ref_model is named as unused.

TRL is the oracle (test extra). Its trainers are built with object.__new__ and only the attributes their loss
code reads (TRL's __init__ wants datasets and an accelerate setup); `Accel` stands in for accelerate on one
process. Tolerances: 1e-6 relative on loss functions fed the same float32 tensors (the same formulas in another
order), 1e-5 where a forward pass runs in each library (float32 summation order in the two models).
"""

import json
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import minitune
from minitune.cli import main
from minitune.rlhf import (PairCollator, dpo_loss, dpo_loss_fn, orpo_loss, orpo_loss_fn, pair_lengths,
                           sequence_logps, simpo_loss, simpo_loss_fn, stack_pairs)
from minitune.rlhf import orpo as orpo_module
from minitune.rlhf import simpo as simpo_module
from hf_factory import hf_model, write_checkpoint
from rlhf_fixtures import pair_world

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental
pytest.importorskip("trl")
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

torch.set_num_threads(1)
REL = 1e-6  # same tensors into both loss functions
FWD = 1e-5  # a forward pass in each library


class Accel:
    """What TRL's loss code reads of accelerate's Accelerator, on one CPU process."""

    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics


def trl_trainer(cls, **attrs):
    trainer = object.__new__(cls)
    trainer.__dict__.update(dict(accelerator=Accel(), aux_loss_enabled=False, is_encoder_decoder=False,
                                 padding_value=0, pad_token_id=0, label_pad_token_id=-100, _tp_size=1, _total_train_tokens=0,
                                 _metrics={"train": defaultdict(list), "eval": defaultdict(list)}), **attrs)
    return trainer


class AsHF(torch.nn.Module):
    """A minitune model behind the call TRL's ORPO / CPO trainers make: model(ids, attention_mask=...).logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=False, **_):
        return SimpleNamespace(logits=self.model(input_ids, attention_mask=attention_mask))


def pair_batch(n: int = 4, seed: int = 0, equal_chosen: bool = False, vocab: int = 320) -> dict:
    """Random token pairs sharing a prompt (labels -100 on it), chosen and rejected of different lengths."""
    g = torch.Generator().manual_seed(seed)
    rint = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()
    feats = []
    for _ in range(n):
        p = rint(2, 7)
        prompt, chosen, rejected = ids(p), ids(5 if equal_chosen else rint(1, 9)), ids(rint(1, 9))
        feats.append({"chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * p + chosen,
                      "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * p + rejected})
    return PairCollator(pad_id=0)(feats)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model with TRL's fused head, minitune's model of the same checkpoint)."""
    path = tmp_path_factory.mktemp("qwen2")
    hf = write_checkpoint("qwen2", path)
    ours = minitune.load_model(path, device="cpu", dtype=torch.float32).eval()
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return hf, ours


def random_logps(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, r = -torch.rand(n, generator=g) * 3, -torch.rand(n, generator=g) * 3
    c[0], r[1] = -1e-6, -40.0  # log1mexp at both ends: a near-certain reply, a hopeless one
    return c, r


# ----------------------------------------------------------------------------- ORPO


def test_orpo_odds_ratio_term_equals_trl_including_near_certain_replies():
    c, r = random_logps()
    losses, *_ = trl_trainer(ORPOTrainer, beta=0.3).odds_ratio_loss(c, r)
    got, chosen_rewards, _, _ = orpo_loss(c, r, nll=torch.tensor(0.0), beta=0.3)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(-losses.mean().item(), rel=REL)  # TRL returns beta * log sigmoid (a gain)
    assert torch.allclose(chosen_rewards, 0.3 * c)


def test_orpo_with_trls_nll_equals_trls_whole_loss(models):
    """TRL's ORPO NLL is the whole chosen sequence's cross-entropy (prompt included), token-averaged."""
    hf, ours = models
    batch = pair_batch(seed=1)
    want, _ = trl_trainer(ORPOTrainer, beta=0.2).get_batch_loss_metrics(hf, batch)
    ids, mask, labels = stack_pairs(batch)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask)
    chosen, rejected = sequence_logps(logits, labels).chunk(2)
    n_chosen, n_rejected = pair_lengths(batch)
    B = len(chosen)
    whole = torch.where(mask[:B] == 1, ids[:B], -100)  # every real token of the chosen rows
    nll = F.cross_entropy(logits[:B, :-1].flatten(0, 1), whole[:, 1:].flatten(), ignore_index=-100)
    got, *_ = orpo_loss(chosen / n_chosen, rejected / n_rejected, nll, beta=0.2)
    assert got.item() == pytest.approx(want.item(), rel=FWD)


def trl_orpo_llamafactory(logits, batch, beta, ftx=0.0):
    """TRL's odds-ratio term on TRL's averaged log-probs + LLaMA-Factory's SFT term (per-token mean of the
    chosen reply's NLL, then batch mean), as LLaMA-Factory's pref_loss: orpo combines them."""
    ids, mask, labels = stack_pairs(batch)
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    c, r = logps.chunk(2)
    losses, *_ = trl_trainer(ORPOTrainer, beta=beta).odds_ratio_loss(c, r)
    return -c.mean() * (1 + ftx) - losses.mean()


@pytest.mark.parametrize("ftx", [0.0, 0.5])
def test_orpo_loss_fn_is_llamafactorys_sft_plus_trls_odds_ratio(models, ftx):
    _, ours = models
    batch = pair_batch(seed=2)
    with torch.no_grad():
        got, n, metrics = orpo_loss_fn(beta=0.1, ftx=ftx)(ours, batch)
        ids, mask, _ = stack_pairs(batch)
        want = trl_orpo_llamafactory(ours(ids, attention_mask=mask), batch, 0.1, ftx)
    assert n == 4 and got.item() == pytest.approx(want.item(), rel=FWD)
    assert {"rewards/margins", "log_odds_ratio", "nll_loss"} <= set(metrics)


# ----------------------------------------------------------------------------- SimPO


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_simpo_loss_equals_trl_cpo_simpo(label_smoothing):
    c, r = random_logps(seed=3)
    trainer = trl_trainer(CPOTrainer, loss_type="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=label_smoothing,
                          alpha=0.0)
    losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(c, r)
    got, ours_c, ours_r = simpo_loss(c, r, beta=2.0, gamma=0.7, label_smoothing=label_smoothing)
    assert got.item() == pytest.approx(losses.mean().item(), rel=REL)
    assert torch.allclose(ours_c, chosen_rewards) and torch.allclose(ours_r, rejected_rewards)


@pytest.mark.parametrize("ftx", [0.0, 0.3])
def test_simpo_loss_fn_with_sft_term_equals_trl_cpo(models, ftx):
    """pref_ftx = TRL's cpo_alpha when a batch's chosen replies have one length (LLaMA-Factory averages per
    reply, TRL over the batch's tokens; see simpo.py)."""
    _, ours = models
    batch = pair_batch(seed=4, equal_chosen=True)
    trainer = trl_trainer(CPOTrainer, loss_type="simpo", beta=2.5, simpo_gamma=0.4, label_smoothing=0.0, alpha=0.0,
                          cpo_alpha=ftx)
    with torch.no_grad():
        want, _ = trainer.get_batch_loss_metrics(AsHF(ours), batch)
        got, _, _ = simpo_loss_fn(beta=2.5, gamma=0.4, ftx=ftx)(ours, batch)
    assert got.item() == pytest.approx(want.item(), rel=FWD)


# ----------------------------------------------------------------------------- DPO's variants through TRL's DPOTrainer


def trl_dpo(hf, batch, loss_types, beta, weights=None):
    ids, mask, labels = stack_pairs(batch)
    trainer = trl_trainer(DPOTrainer, model=hf, beta=beta, loss_types=loss_types,
                          loss_weights=weights or [1.0] * len(loss_types), label_smoothing=0.0, ld_alpha=None,
                          precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False,
                          ref_model=None)
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": (labels != -100).long(),
              "ref_chosen_logps": batch["ref_chosen_logps"], "ref_rejected_logps": batch["ref_rejected_logps"]}
    with torch.no_grad():
        return trainer._compute_loss(hf, inputs, return_outputs=False)


def with_reference(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(batch["chosen_input_ids"])
    return {**batch, "ref_chosen_logps": -20 + 5 * torch.randn(n, generator=g),
            "ref_rejected_logps": -20 + 5 * torch.randn(n, generator=g)}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_types_equal_trls_dpo_trainer(models, loss_type):
    """ipo included: both average the log-ratios per response token (the replies here differ in length, so a
    summed IPO would not match)."""
    hf, ours = models
    batch = with_reference(pair_batch(seed=5))
    want = trl_dpo(hf, batch, [loss_type], beta=0.3)
    with torch.no_grad():
        got, _, _ = dpo_loss_fn(beta=0.3, loss_type=loss_type)(ours, batch)
    assert got.item() == pytest.approx(want.item(), rel=FWD)


def test_ipo_summed_would_differ_from_trl(models):
    hf, ours = models
    batch = with_reference(pair_batch(seed=5))
    with torch.no_grad():
        from_sums, _, _ = dpo_loss(*dpo_inputs(ours, batch), beta=0.3, loss_type="ipo")
    assert from_sums.item() != pytest.approx(trl_dpo(hf, batch, ["ipo"], beta=0.3).item(), rel=1e-2)


def dpo_inputs(model, batch):
    ids, mask, labels = stack_pairs(batch)
    chosen, rejected = sequence_logps(model(ids, attention_mask=mask), labels).chunk(2)
    return chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"]


def test_pref_ftx_equals_trls_sigmoid_plus_sft_loss(models):
    """LLaMA-Factory's pref_ftx = TRL's loss_type [sigmoid, sft] weighted [1, ftx] (one chosen length)."""
    hf, ours = models
    batch = with_reference(pair_batch(seed=6, equal_chosen=True))
    want = trl_dpo(hf, batch, ["sigmoid", "sft"], beta=0.1, weights=[1.0, 0.7])
    with torch.no_grad():
        got, _, _ = dpo_loss_fn(beta=0.1, ftx=0.7)(ours, batch)
    assert got.item() == pytest.approx(want.item(), rel=FWD)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_label_smoothing_is_trls_conservative_sigmoid(eps):
    """TRL 1.16's DPO "sigmoid" has no label smoothing; its CPO "sigmoid" loss is cDPO's formula, so it takes the
    log-ratios: -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)."""
    c, r = random_logps(seed=7)
    rc, rr = c - 0.5 * torch.rand(16), r + torch.rand(16)
    losses, *_ = trl_trainer(CPOTrainer, loss_type="sigmoid", beta=0.4, label_smoothing=eps, alpha=0.0).cpo_loss(
        c - rc, r - rr)
    got, _, _ = dpo_loss(c, r, rc, rr, beta=0.4, label_smoothing=eps)
    assert got.item() == pytest.approx(losses.mean().item(), rel=REL)


# ----------------------------------------------------------------------------- minitune train, step by step


def synthetic_pairs(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        a, b = torch.randint(0, 10, (2,), generator=g).tolist()
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": f"{a * b}"})
    return rows


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers-written Qwen2 checkpoint with a BPE tokenizer trained on the pairs' text."""
    _, tok = pair_world(synthetic_pairs(32))
    path = tmp_path_factory.mktemp("hf") / "model"
    hf_model("qwen2", seed=1, vocab_size=tok.vocab_size).save_pretrained(path)
    tok.save(path)
    data = path.parent / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in synthetic_pairs(32)))
    return path, data


def trl_simpo(model, batch, cfg):
    trainer = trl_trainer(CPOTrainer, loss_type="simpo", beta=cfg["pref_beta"], simpo_gamma=cfg["simpo_gamma"],
                          label_smoothing=0.0, alpha=0.0, cpo_alpha=0.0)
    return trainer.get_batch_loss_metrics(AsHF(model), batch)[0]


def trl_orpo(model, batch, cfg):
    ids, mask, _ = stack_pairs(batch)
    return trl_orpo_llamafactory(model(ids, attention_mask=mask), batch, cfg["pref_beta"])


@pytest.mark.parametrize("pref_loss,finetuning_type", [("orpo", "full"), ("simpo", "lora"), ("orpo", "lora"),
                                                       ("simpo", "full")])
def test_minitune_train_logs_trls_loss_at_every_step(hf_dir, tmp_path, monkeypatch, capsys, pref_loss,
                                                     finetuning_type):
    """Each step's loss_fn call is shadowed by TRL's loss on the same batch and the same (current) weights; the
    trainer's logged loss is that number."""
    path, data = hf_dir
    module, name, oracle = {"orpo": (orpo_module, "orpo_loss_fn", trl_orpo),
                            "simpo": (simpo_module, "simpo_loss_fn", trl_simpo)}[pref_loss]
    settings = {"pref_beta": 0.25 if pref_loss == "orpo" else 2.0, "simpo_gamma": 0.3}
    made, seen = getattr(module, name), []

    def shadowed(*args, **kw):
        inner = made(*args, **kw)

        def loss_fn(model, batch):
            out = inner(model, batch)
            with torch.no_grad():
                seen.append((out[0].item(), oracle(model, batch, settings).item()))
            return out
        return loss_fn

    monkeypatch.setattr(module, name, shadowed)
    main(["train", "--stage", "dpo", "--pref_loss", pref_loss, "--finetuning_type", finetuning_type,
          "--model_name_or_path", str(path), "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
          "--per_device_train_batch_size", "4", "--max_steps", "3", "--logging_steps", "1", "--save_steps", "0",
          "--learning_rate", "1e-2", "--device", "cpu", "--cutoff_len", "64",
          *[x for k, v in settings.items() for x in (f"--{k}", str(v))]])
    assert "dpo: trained 3 steps" in capsys.readouterr().out
    assert len(seen) == 3
    for ours, trl in seen:
        assert ours == pytest.approx(trl, rel=FWD)
    logged = [json.loads(x)["loss"] for x in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert logged[:3] == pytest.approx([t for _, t in seen], rel=1e-4)
    assert len({round(t, 6) for _, t in seen}) == 3  # the weights moved: three different losses


def test_ref_model_with_orpo_is_named_unused(hf_dir, tmp_path, capsys):
    path, data = hf_dir
    main(["train", "--stage", "dpo", "--pref_loss", "simpo", "--ref_model", str(path), "--model_name_or_path",
          str(path), "--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
          "--per_device_train_batch_size", "4", "--save_steps", "0", "--device", "cpu", "--cutoff_len", "64"])
    err = capsys.readouterr().err
    assert "note: ref_model is not used: pref_loss simpo needs no reference model" in err


def test_bad_preference_settings_name_the_key(hf_dir, tmp_path):
    path, data = hf_dir
    base = ["train", "--stage", "dpo", "--model_name_or_path", str(path), "--dataset", str(data), "--output_dir",
            str(tmp_path / "out")]
    for flags, key in ((["--pref_loss", "kto_pair"], "pref_loss"), (["--pref_ftx", "-1"], "pref_ftx"),
                       (["--kto_chosen_weight", "0"], "kto_chosen_weight"),
                       (["--pref_loss", "simpo", "--dpo_label_smoothing", "0.1"], "dpo_label_smoothing")):
        with pytest.raises(SystemExit, match=key):
            main(base + flags)


def test_ref_model_is_dpos_reference(hf_dir, tmp_path):
    """Without ref_model the reference is the starting model (step 1: reward margin 0); with another checkpoint
    as ref_model the step-1 margins are that model's log-ratios, not 0."""
    path, data = hf_dir
    other = tmp_path / "ref"
    hf_model("qwen2", seed=7, vocab_size=minitune.load_tokenizer(path).vocab_size).save_pretrained(other)
    margins = {}
    for name, extra in (("self", []), ("other", ["--ref_model", str(other)])):
        out = tmp_path / name
        main(["train", "--stage", "dpo", "--model_name_or_path", str(path), "--dataset", str(data), "--output_dir",
              str(out), "--max_steps", "1", "--logging_steps", "1", "--per_device_train_batch_size", "4",
              "--save_steps", "0", "--device", "cpu", "--cutoff_len", "64", *extra])
        margins[name] = json.loads((out / "trainer_log.jsonl").read_text().splitlines()[0])["rewards/margins"]
    assert margins["self"] == pytest.approx(0.0, abs=1e-6) and abs(margins["other"]) > 1e-3
