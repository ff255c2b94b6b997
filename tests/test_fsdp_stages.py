"""The reward model and DPO sharded on 2 CPU processes (gloo), full fine-tuning and LoRA, and KTO and ORPO
beside them: the same losses and metrics as one process with the same global batch (KTO's reference
point z0 gathered over the processes), a sharded checkpoint resumes the run, and what
rank 0 writes at the end loads back (transformers for the full DPO model, PEFT for the LoRA adapter,
load_reward_model for the reward model) with the one process's numbers.

The stages run through minitune.train, so this is train/fsdp.py under the pairwise and DPO losses: a
RewardModel is sharded with its value head in the root unit; DPO's reference log-probs are computed
before sharding. One spawn of 2 processes runs every case (~20-40 s on 2 busy cores).
"""

import os

import pytest
import torch
from rlhf_fixtures import fresh_model, pair_world
from ranks import copy_checkpoint, keys_to_int, on_ranks
from test_dpo_training import synthetic_pairs

from minitune.model import save_pretrained
from minitune.peft import apply_lora
from minitune.peft.adapter_io import save_adapter
from minitune.data.kto import KTOExample, prepare_kto
from minitune.rlhf import (PairCollator, RewardModel, load_reward_model, prepare_pairs, save_reward_model, score_pairs,
                           stack_pairs, train_dpo, train_kto, train_orpo, train_reward_model)
from minitune.train import TrainConfig

TOL = 1e-5  # the sharded run vs one process: the same sums in another order (float32 rounding)
STEPS = 4
PAIRS = synthetic_pairs(40, seed=9)
# (name, stage, finetuning, fsdp option, per-device batch, accumulation): 2 ranks x 2 x 1 or 2 x 1 x 2 = global 4
CASES = [("rm_full", "rm", "full", "full_shard", 2, 1), ("rm_lora", "rm", "lora", "shard_grad_op", 1, 2),
         ("dpo_full", "dpo", "full", "full_shard", 2, 1), ("dpo_lora", "dpo", "lora", "full_shard offload", 1, 2),
         ("kto_full", "kto", "full", "full_shard", 2, 1), ("orpo_lora", "orpo", "lora", "shard_grad_op", 2, 1)]


def world():
    """The tiny model's config and tokenizer, and the prepared pairs (the same in every process)."""
    cfg, tok = pair_world(PAIRS)
    return cfg, tok, prepare_pairs(PAIRS, tok, "chatml", cutoff_len=64, val_size=0, seed=0)


def kto_data(tok):
    """The pairs as unpaired replies: the chosen one of even rows (desirable), the rejected one of odd rows."""
    examples = [KTOExample([{"role": "user", "content": r["prompt"]}], r["chosen"] if i % 2 == 0 else r["rejected"],
                           i % 2 == 0) for i, r in enumerate(PAIRS)]
    return prepare_kto(examples, tok, "chatml", cutoff_len=64)


def run(stage: str, ft: str, batch: int, accum: int = 1, **kw):
    """Train; returns (losses, metrics per step, the trained model: a RewardModel for rm)."""
    cfg_model, tok, data = world()
    model = fresh_model(cfg_model, 0)
    if ft == "lora":
        torch.manual_seed(5)  # LoRA's A is drawn here: the same in every process
        apply_lora(model, r=4, alpha=8, targets="all-linear")
    stage, pref_loss = ("dpo", "orpo") if stage == "orpo" else (stage, "sigmoid")
    cfg = TrainConfig(**{**dict(stage=stage, pref_loss=pref_loss, finetuning_type=ft, learning_rate=3e-3, max_steps=STEPS, logging_steps=1,
                                save_steps=0, device="cpu", seed=0, pref_beta=0.5, per_device_train_batch_size=batch,
                                gradient_accumulation_steps=accum), **kw})
    if stage == "rm":
        model = RewardModel(model)
        result = train_reward_model(model, data, cfg, tok)
    elif stage == "kto":
        result = train_kto(model, kto_data(tok), cfg, tok)
    elif pref_loss == "orpo":
        result = train_orpo(model, data, cfg, tok)
    else:
        result = train_dpo(model, data, cfg, tok)
    return result, model


def flat(model) -> list[float]:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()


def worker(rank: int, out: str) -> dict:
    got = {}
    for name, stage, ft, option, batch, accum in CASES:
        save = dict(output_dir=os.path.join(out, "a"), save_steps=2) if name == "dpo_full" else {}
        result, model = run(stage, ft, batch, accum, fsdp=option, **save)
        got[name] = {"losses": result.losses, "metrics": result.metrics, "params": flat(model)}
        if rank == 0:  # what `minitune train` writes at the end, from the gathered model
            _, tok, _ = world()
            if name == "dpo_full":
                save_pretrained(model, None, os.path.join(out, "dpo_full"))
            elif name == "dpo_lora":
                save_adapter(model, os.path.join(out, "dpo_lora"))
            elif name == "rm_full":
                save_reward_model(model, tok, os.path.join(out, "rm_full"))
    # resume: checkpoint-2 of dpo_full, alone in a new folder, continues to the same steps 3 and 4
    result, _ = run("dpo", "full", 2, fsdp="full_shard", output_dir=copy_checkpoint(rank, out), save_steps=2,
                    resume=True)
    got["resumed"] = {"losses": result.losses}
    return got


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fsdp_stages")
    single = {}
    for name, stage, ft, _, _, _ in CASES:
        result, model = run(stage, ft, 4)
        single[name] = {"losses": result.losses, "metrics": result.metrics, "params": flat(model), "model": model}
    save_pretrained(fresh_model(world()[0], 0), None, out / "base")  # the LoRA adapter's base, for PEFT
    ranks = on_ranks(worker, out)
    for got in ranks:
        for case in got.values():
            case["losses"], case["metrics"] = keys_to_int(case["losses"]), keys_to_int(case.get("metrics", {}))
    return single, ranks, out


@pytest.mark.slow
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_sharded_preference_stages_match_one_process_with_the_same_global_batch(runs, name):
    single, ranks, _ = runs
    want = single[name]
    for got in ranks:
        assert sorted(got[name]["losses"]) == list(range(1, STEPS + 1))
        for step, loss in want["losses"].items():
            assert got[name]["losses"][step] == pytest.approx(loss, abs=TOL)
            for key, value in want["metrics"][step].items():  # accuracy, margin; DPO's rewards and log-probs
                if name.startswith("kto") and key != "kl":  # KTO's are means over one kind of reply, which a
                    continue  # split batch weights differently (as accumulation does); z0 ("kl") must agree
                assert got[name]["metrics"][step][key] == pytest.approx(value, abs=TOL), (step, key)
        assert torch.allclose(torch.tensor(got[name]["params"]), torch.tensor(want["params"]), atol=1e-4)


@pytest.mark.slow
def test_resume_from_a_sharded_dpo_checkpoint_reproduces_the_run(runs):
    _, ranks, out = runs
    assert (out / "a" / "checkpoint-2" / "shard-rank1-of-2.safetensors").exists()
    for got in ranks:
        assert sorted(got["resumed"]["losses"]) == [3, 4]
        for step in (3, 4):
            assert got["resumed"]["losses"][step] == pytest.approx(got["dpo_full"]["losses"][step], abs=1e-6)


def pair_batch():
    _, tok, data = world()
    ids, mask, _ = stack_pairs(PairCollator(tok)(data.train[:4]))
    return ids, mask


@pytest.mark.slow
def test_the_gathered_dpo_model_loads_in_transformers_and_peft_with_the_same_logits(runs):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    single, _, out = runs
    ids, mask = pair_batch()
    real = mask.bool()  # padded positions are nobody's prediction (transformers fills them otherwise)
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(out / "dpo_full").eval()
        want = single["dpo_full"]["model"].eval()(ids, attention_mask=mask)
        assert torch.allclose(hf(ids, attention_mask=mask).logits[real], want[real], atol=1e-4)
        base = transformers.AutoModelForCausalLM.from_pretrained(out / "base")
        hf_lora = peft.PeftModel.from_pretrained(base, out / "dpo_lora").eval()
        want = single["dpo_lora"]["model"].eval()(ids, attention_mask=mask)
        assert torch.allclose(hf_lora(ids, attention_mask=mask).logits[real], want[real], atol=1e-4)


@pytest.mark.slow
def test_the_gathered_reward_model_scores_as_the_one_process_model(runs):
    single, _, out = runs
    _, tok, data = world()
    rm, _ = load_reward_model(out / "rm_full")
    got, want = score_pairs(rm, data.train, tok), score_pairs(single["rm_full"]["model"], data.train, tok)
    assert torch.allclose(torch.tensor(got["chosen"]), torch.tensor(want["chosen"]), atol=1e-4)
    assert torch.allclose(torch.tensor(got["rejected"]), torch.tensor(want["rejected"]), atol=1e-4)
