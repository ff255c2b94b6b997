"""PPO and GRPO on 2 CPU processes (gloo) with the actor, critic, reference and reward model sharded
(rlhf/sharded.py): each rank rolls out half of every batch, and the run takes the steps of one process
that trains on the same rollouts; a sharded RL checkpoint resumes the run.

"The same rollouts": rank r samples its half with its own seed, so the one-process run here samples the
two halves with those two seeds and trains on them together (`two_rank_rollouts`); everything after the
sampling (scores, whitening over the whole batch, the loss weights, FSDP's gradient average) is what
is tested. One minibatch per epoch: then the ranks' minibatches together are one process's.

One spawn of 2 processes runs every case (~20-40 s on 2 busy cores).
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from rlhf_fixtures import EOS, PAD, PROMPTS, target_rate, tiny
from ranks import copy_checkpoint, on_ranks

import minitune.rlhf.grpo as grpo_module
import minitune.rlhf.ppo_trainer as ppo_module
from minitune.peft.lora import apply_lora
from minitune.rlhf import GRPOConfig, PPOConfig, RewardModel, Rollout, sample_rollout, train_grpo, train_ppo

TOL = 1e-5  # a record of the sharded run vs one process: the same sums in another order (float32 rounding)
STEPS = 4
# (name, algorithm, finetuning, fsdp option)
CASES = [("ppo_full", "ppo", "full", "full_shard"), ("ppo_lora", "ppo", "lora", "shard_grad_op"),
         ("grpo_full", "grpo", "full", "full_shard"), ("grpo_lora", "grpo", "lora", "full_shard offload")]
KEYS = {"ppo": ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "clip_frac", "approx_kl", "entropy",
                "response_length", "repetition_rate"),
        "grpo": ("reward", "kl", "flat_groups", "loss", "token_kl", "clip_frac", "response_length")}


def models(algo: str, ft: str):
    """actor, critic, reference, reward. full: a separate reference and (PPO) a reward model; lora: the
    adapter switched off is the reference, and the reward is the token rule."""
    actor = tiny(0)
    if ft == "lora":
        torch.manual_seed(5)  # LoRA's A is drawn here: the same in every process
        apply_lora(actor, r=4, alpha=8, targets="all-linear")
    critic = RewardModel(tiny(1), init_std=0.0) if algo == "ppo" else None
    reference = copy.deepcopy(tiny(0)) if ft == "full" else None
    reward = RewardModel(tiny(2)) if (algo, ft) == ("ppo", "full") else target_rate
    return actor, critic, reference, reward


def run(algo: str, ft: str, fsdp=None, **kw):
    actor, critic, reference, reward = models(algo, ft)
    if algo == "ppo":
        cfg = PPOConfig(steps=STEPS, batch_size=8, mini_batch_size=8, ppo_epochs=2, learning_rate=3e-3,
                        init_kl_coef=0.05, adap_kl_ctrl=True, max_new_tokens=6, warn=False, fsdp=fsdp, **kw)
        records = train_ppo(actor, critic, reference, reward, PROMPTS, cfg, [EOS], PAD)
    else:
        cfg = GRPOConfig(steps=STEPS, batch_size=4, num_generations=4, mini_batch_size=16, num_iterations=2,
                         learning_rate=3e-3, max_new_tokens=6, warn=False, fsdp=fsdp, **kw)
        records = train_grpo(actor, reference, reward, PROMPTS, cfg, [EOS], PAD)
    params = torch.cat([p.detach().flatten() for p in actor.parameters()]).tolist()
    return {"records": [{k: r[k] for k in KEYS[algo]} for r in records], "params": params}


def two_rank_rollouts(actor, prompts, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_k=None, seed=None):
    """One process sampling what 2 ranks sample: each half of the rows with that rank's seed (sharded.py's
    DataParallelRL.seed), then the two rollouts laid out as one (prompts left-padded, responses right)."""
    half = len(prompts) // 2
    rolls = [sample_rollout(actor, rows, max_new_tokens, stop_ids, pad_id, temperature, top_k, seed + 1_000_003 * r)
             for r, rows in enumerate((prompts[:half], prompts[half:]))]
    P, N = max(r.prompt_len for r in rolls), max(r.responses.shape[1] for r in rolls)
    ids, attention, responses = [], [], []
    for r in rolls:
        p, n = r.prompt_len, r.responses.shape[1]
        ids.append(torch.cat([F.pad(r.ids[:, :p], (P - p, 0), value=pad_id), F.pad(r.ids[:, p:], (0, N - n), value=pad_id)], 1))
        resp = F.pad(r.response_mask, (0, N - n))
        attention.append(torch.cat([F.pad(r.attention_mask[:, :p], (P - p, 0)), resp], 1))
        responses.append(resp)
    return Rollout(torch.cat(ids), torch.cat(attention), torch.cat(responses), P)


def worker(rank: int, out: str) -> dict:
    got = {}
    for name, algo, ft, option in CASES:
        save = dict(output_dir=os.path.join(out, "a"), save_steps=2) if name == "grpo_full" else {}
        got[name] = run(algo, ft, option, **save)
    # resume: checkpoint-2 of grpo_full, alone in a new folder, continues to the same steps 3 and 4
    got["resumed"] = run("grpo", "full", "full_shard", output_dir=copy_checkpoint(rank, out), save_steps=2,
                         resume=True)
    return got


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fsdp_rl")
    single = {}
    with pytest.MonkeyPatch.context() as mpatch:
        for module in (ppo_module, grpo_module):
            mpatch.setattr(module, "sample_rollout", two_rank_rollouts)
        for name, algo, ft, _ in CASES:
            single[name] = run(algo, ft)
    return single, on_ranks(worker, out), out


@pytest.mark.slow
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_sharded_rl_takes_one_process_steps_on_the_same_rollouts(runs, name):
    single, ranks, _ = runs
    want = single[name]
    for got in ranks:
        assert len(got[name]["records"]) == STEPS
        for step, (a, b) in enumerate(zip(got[name]["records"], want["records"]), 1):
            for key in a:
                assert a[key] == pytest.approx(b[key], abs=TOL), (step, key)
        # the actor gathered back on every rank is the one process's (AdamW magnifies float noise: 1e-4)
        assert torch.allclose(torch.tensor(got[name]["params"]), torch.tensor(want["params"]), atol=1e-4)


@pytest.mark.slow
def test_a_sharded_rl_checkpoint_resumes_the_run(runs):
    _, ranks, out = runs
    files = sorted(p.name for p in (out / "a" / "checkpoint-2").iterdir())
    assert files == ["actor-rank0-of-2.safetensors", "actor-rank1-of-2.safetensors", "optimizers-rank0-of-2.pt",
                     "optimizers-rank1-of-2.pt", "trainer_state.json", "trainer_state.pt"]
    assert not [p for p in (out / "a").iterdir() if p.name.startswith(".")]  # no temporary folder left
    # each rank wrote its half of the actor (dim 0 of an odd size splits unevenly: 5%)
    held = [sum(t.numel() for t in load_file(out / "a" / "checkpoint-2" / f"actor-rank{r}-of-2.safetensors").values())
            for r in range(2)]
    whole = sum(p.numel() for p in tiny(0).parameters())
    assert sum(held) == whole and all(h == pytest.approx(whole / 2, rel=0.05) for h in held)
    for got in ranks:
        resumed, whole = got["resumed"]["records"], got["grpo_full"]["records"]
        assert len(resumed) == STEPS
        for a, b in zip(resumed[2:], whole[2:]):
            for key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert torch.allclose(torch.tensor(got["resumed"]["params"]), torch.tensor(got["grpo_full"]["params"]),
                              atol=1e-6)
