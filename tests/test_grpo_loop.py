"""The GRPO loop on a tiny random model: the rule reward rises, the reference stays put, groups
are laid out as group_advantages expects; the worded arithmetic prompts; lesson 13 --fast."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minitune.rlhf import GRPOConfig, arithmetic_reward, grpo_step, train_grpo
from minitune.train import make_optimizer
from rlhf_fixtures import CFG, EOS, PAD, PROMPTS, TARGET, mean_target_rate, target_rate, tiny
from test_lesson_sections import assert_sections_printed  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]


def test_grpo_raises_the_rule_reward_and_keeps_the_reference_fixed(tmp_path):
    actor = tiny()
    reference = copy.deepcopy(actor)
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    before = mean_target_rate(actor)
    cfg = GRPOConfig(steps=10, batch_size=4, num_generations=4, mini_batch_size=8, learning_rate=3e-3,
                     max_new_tokens=6, log_path=str(tmp_path / "grpo.jsonl"), warn=False)
    records = train_grpo(actor, reference, target_rate, PROMPTS, cfg, [EOS], PAD)
    after = mean_target_rate(actor)
    assert after > before + 0.1, (before, after)
    assert all(torch.isfinite(torch.tensor([r["kl"] for r in records])))
    assert records[-1]["token_kl"] >= 0  # k3 is never negative
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in ref_before.items())
    assert len((tmp_path / "grpo.jsonl").read_text().splitlines()) == 10


def test_groups_are_contiguous_and_a_flat_group_teaches_nothing():
    actor = tiny()
    reference = copy.deepcopy(actor)
    seen = []

    def reward(prompt_ids, response_ids):  # depends on the prompt only: every group is flat
        seen.append(tuple(prompt_ids))
        return float(len(prompt_ids))

    before = copy.deepcopy(actor.state_dict())
    cfg = GRPOConfig(batch_size=3, num_generations=4, mini_batch_size=12, beta=0.0, max_new_tokens=4,
                     learning_rate=1e-2)
    rec = grpo_step(actor, reference, reward, make_optimizer(actor, cfg.learning_rate), PROMPTS[:3], cfg, [EOS], PAD)
    assert seen == [tuple(p) for p in PROMPTS[:3] for _ in range(4)]  # G copies of prompt 0, then of prompt 1...
    assert rec["flat_groups"] == 1.0
    # advantage 0 everywhere and beta 0: the loss has no gradient, AdamW moves nothing (no weight decay)
    assert all(torch.allclose(v, actor.state_dict()[k]) for k, v in before.items())


def test_grpo_config_checks_minibatch():
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        GRPOConfig(batch_size=3, num_generations=3, mini_batch_size=4)


@pytest.mark.parametrize("prompt,response,reward", [
    ("What is 3+4?", "7", 1.0),
    ("How much is 3 plus 4?", "The answer is 7.", 1.0),
    ("Tell me the sum of 10 and 9.", "19", 1.0),
    ("Add 2 and 5.", "8", 0.0),
    ("Calculate 6 + 0.", "6", 1.0),
    ("<|im_start|>user\nWhat is 8 minus 3?<|im_end|>\n<|im_start|>assistant\n", "5", 1.0),
])
def test_arithmetic_reward_reads_worded_questions(prompt, response, reward):
    assert arithmetic_reward(prompt, response) == reward


@pytest.mark.skipif(not (ROOT / "weights/tiny/config.json").exists(),
                    reason="weights/tiny is not built yet (python -m minitune.tiny.build --out weights/tiny)")
def test_lesson_13_fast_runs():
    out = subprocess.run([sys.executable, "lessons/13-grpo/run.py", "--fast"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for expected in ("accuracy", "KL"):
        assert expected in out.stdout, expected
    assert_sections_printed("13-grpo", out.stdout)
