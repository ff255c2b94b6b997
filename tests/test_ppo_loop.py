"""The PPO loop on a tiny random model with a rule reward: it learns, the reference stays put,
rollouts respect EOS and masks, the collapse watch fires; lesson 11 runs in --fast mode."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minitune.rlhf import PPOConfig, RewardModel, ppo_step, response_logprobs, sample_rollout, train_ppo
from minitune.rlhf.ppo import FixedKLController, entropy_from_logits, logprobs_from_logits
from minitune.train import make_optimizer
from rlhf_fixtures import CFG, EOS, PAD, PROMPTS, TARGET, mean_target_rate, target_rate, tiny
from test_lesson_sections import assert_sections_printed  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]


def bias_token(model, token, amount):
    """Make `token` (much) more likely at every position: a hook on the LM head's logits."""
    bias = torch.zeros(CFG.vocab_size)
    bias[token] = amount
    return model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)


def test_ppo_raises_the_rule_reward_and_keeps_the_reference_fixed():
    actor = tiny()
    reference, critic = copy.deepcopy(actor), RewardModel(copy.deepcopy(actor))
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    before = mean_target_rate(actor)
    cfg = PPOConfig(steps=8, batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=3e-3, init_kl_coef=0.05,
                    max_new_tokens=6, warn=False)
    records = train_ppo(actor, critic, reference, target_rate, PROMPTS, cfg, [EOS], PAD)
    after = mean_target_rate(actor)
    assert after > before + 0.1, (before, after)
    kls = [r["kl"] for r in records]
    assert all(torch.isfinite(torch.tensor(kls))) and abs(kls[-1]) < 50
    for key in ("reward", "kl", "kl_coef", "clip_frac", "entropy", "response_length", "repetition_rate", "value_loss"):
        assert key in records[-1]
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in ref_before.items())


def test_reward_model_and_reference_never_change_while_actor_and_critic_do(tmp_path):
    actor = tiny()
    reference, critic, rm = copy.deepcopy(actor), RewardModel(copy.deepcopy(actor)), RewardModel(tiny(1))
    frozen = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in (("ref", reference), ("rm", rm))}
    actor0, critic0 = copy.deepcopy(actor.state_dict()), copy.deepcopy(critic.state_dict())
    log = tmp_path / "ppo.jsonl"
    cfg = PPOConfig(steps=2, batch_size=8, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-3, max_new_tokens=4,
                    adap_kl_ctrl=True, target_kl=0.1, horizon=100, log_path=str(log), warn=False)
    records = train_ppo(actor, critic, reference, rm, PROMPTS, cfg, [EOS], PAD)
    for name, m in (("ref", reference), ("rm", rm)):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in frozen[name].items()), name
    assert any(not torch.equal(v, actor.state_dict()[k]) for k, v in actor0.items())
    assert any(not torch.equal(v, critic.state_dict()[k]) for k, v in critic0.items())
    assert len(log.read_text().splitlines()) == 2
    assert records[0]["kl_coef"] == cfg.init_kl_coef  # the adaptive controller moves it after the step


def test_rollouts_stop_at_eos_and_mask_padding():
    actor = tiny()
    hook = bias_token(actor, EOS, 1.5)  # EOS likely but not certain: rows stop at different columns
    roll = sample_rollout(actor, PROMPTS[:12], max_new_tokens=8, stop_ids=[EOS], pad_id=PAD, seed=0)
    hook.remove()
    P = roll.prompt_len
    for i, prompt in enumerate(PROMPTS[:12]):
        assert roll.attention_mask[i, :P].tolist() == [0] * (P - len(prompt)) + [1] * len(prompt)
        resp, m = roll.responses[i].tolist(), roll.response_mask[i].tolist()
        stop = resp.index(EOS) if EOS in resp else len(resp) - 1
        assert m == [1] * (stop + 1) + [0] * (len(resp) - stop - 1)  # the stop token itself is real
        assert all(t == EOS for t in resp[stop + 1:])  # the generator's filler after a stop
        assert roll.attention_mask[i, P:].tolist() == m
    assert roll.response_mask.sum(1).min() >= 1 and roll.response_mask.sum(1).max() > 1

    # log-probs of the padded batch equal those of each row alone, unpadded
    with torch.no_grad():
        logp = response_logprobs(actor, roll)
        for i in range(12):
            real = [t for t, a in zip(roll.ids[i].tolist(), roll.attention_mask[i].tolist()) if a]
            n_prompt = int(roll.attention_mask[i, :P].sum())
            logits = actor(torch.tensor([real]))[:, n_prompt - 1:-1]
            alone = logprobs_from_logits(logits, torch.tensor([real[n_prompt:]]))[0]
            n = int(roll.response_mask[i].sum())
            assert torch.allclose(logp[i, :n], alone, atol=1e-5)


@pytest.mark.parametrize("collapse", ["eos", "loop"])
def test_collapse_warnings_fire_on_a_forced_collapse(collapse, capsys):
    actor = tiny()
    # EOS-only: EOS overwhelmingly likely. Loop: token 7 overwhelmingly likely, EOS never.
    hooks = [bias_token(actor, EOS, 50.0)] if collapse == "eos" else [bias_token(actor, 7, 50.0),
                                                                       bias_token(actor, EOS, -50.0)]
    reference, critic = copy.deepcopy(actor), RewardModel(copy.deepcopy(actor))
    cfg = PPOConfig(steps=1, batch_size=8, mini_batch_size=8, ppo_epochs=1, learning_rate=1e-4, init_kl_coef=0.0,
                    max_new_tokens=8)
    records = train_ppo(actor, critic, reference, target_rate, PROMPTS, cfg, [EOS], PAD)
    for h in hooks:
        h.remove()
    rec = records[0]
    want = "EOS-only collapse" if collapse == "eos" else "loop collapse"
    assert any(want in w for w in rec["warnings"]), rec["warnings"]
    assert want in capsys.readouterr().out  # printed, not only logged
    if collapse == "eos":
        assert rec["response_length"] == 1.0 and rec["short_frac"] == 1.0
    else:
        assert rec["repetition_rate"] > 0.5 and rec["response_length"] == 8.0


def test_healthy_rollout_has_no_warnings():
    actor = tiny()
    reference, critic = copy.deepcopy(actor), RewardModel(copy.deepcopy(actor))
    cfg = PPOConfig(batch_size=8, mini_batch_size=8, ppo_epochs=1, max_new_tokens=8)
    rec = ppo_step(actor, critic, reference, target_rate, make_optimizer(actor, 1e-4), make_optimizer(critic, 1e-4),
                   PROMPTS[:8], cfg, FixedKLController(0.1), [EOS], PAD)
    assert rec["warnings"] == [] and rec["response_length"] > 1.5


def test_log_probs_are_those_of_the_sampling_temperature():
    """With temperature T the rollout is drawn from softmax(logits / T): old, new and reference log-probs
    (and the entropy) must be of that distribution, or the first PPO ratio is not 1 and the KL is off."""
    actor, T = tiny(), 0.5
    reference, critic = copy.deepcopy(actor), RewardModel(copy.deepcopy(actor), init_std=0.0)
    cfg = PPOConfig(batch_size=8, mini_batch_size=8, ppo_epochs=1, max_new_tokens=6, temperature=T, warn=False)
    roll = sample_rollout(actor, PROMPTS[:8], 6, [EOS], PAD, temperature=T, seed=cfg.seed * 100_003)  # ppo_step's draw
    with torch.no_grad():
        pos = (roll.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = actor(roll.ids, attention_mask=roll.attention_mask, position_ids=pos)[:, roll.prompt_len - 1:-1] / T
        expected = torch.log_softmax(logits, -1).gather(-1, roll.responses.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(response_logprobs(actor, roll, temperature=T), expected, atol=1e-5)
        entropy = entropy_from_logits(logits)
    m = roll.response_mask.float()
    rec = ppo_step(actor, critic, reference, target_rate, make_optimizer(actor, 1e-3), make_optimizer(critic, 1e-3),
                   PROMPTS[:8], cfg, FixedKLController(0.1), [EOS], PAD)
    assert rec["approx_kl"] < 1e-9 and rec["clip_frac"] == 0.0  # one update, before it: ratio 1 (to rounding)
    assert abs(rec["kl"]) < 1e-5  # the reference is the same model at the same temperature
    assert abs(rec["entropy"] - ((entropy * m).sum() / m.sum()).item()) < 1e-5


def test_a_critic_head_can_start_at_zero():
    critic = RewardModel(tiny(), init_std=0.0)
    assert torch.count_nonzero(critic.token_values(torch.tensor([[2, 3, 4]]))) == 0
    rm = RewardModel(tiny())  # a reward model: small random head, std 1/sqrt(H + 1)
    assert abs(rm.value_head.weight.std().item() - (CFG.hidden_size + 1) ** -0.5) < 0.1


def test_config_checks_minibatch_divides_batch():
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        PPOConfig(batch_size=10, mini_batch_size=4)


@pytest.mark.skipif(not (ROOT / "weights/tiny/config.json").exists(),
                    reason="weights/tiny is not built yet (python -m minitune.tiny.build --out weights/tiny)")
def test_lesson_11_fast_runs():
    out = subprocess.run([sys.executable, "lessons/11-ppo/run.py", "--fast"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for expected in ("GAE by hand", "by hand == compute_gae: True", "healthy run", "collapsed run", "held-out replies"):
        assert expected in out.stdout, expected
    assert_sections_printed("11-ppo", out.stdout)


@pytest.mark.skipif(not (ROOT / "weights/tiny/config.json").exists(),
                    reason="weights/tiny is not built yet (python -m minitune.tiny.build --out weights/tiny)")
@pytest.mark.parametrize("stage,finetuning_type", [("ppo", "lora"), ("grpo", "full")])
def test_cli_trains_ppo_and_grpo_stages(tmp_path, stage, finetuning_type):
    import json

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {a}+{b}?", "input": "", "output": str(a + b)}) + "\n"
                            for a, b in ((1, 2), (3, 4), (5, 6), (7, 1))))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "minitune", "train", "--stage", stage, "--finetuning_type",
                          finetuning_type, "--model_name_or_path", str(ROOT / "weights/tiny"), "--dataset", str(data),
                          "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "2",
                          "--num_generations", "2", "--max_new_tokens", "4", "--ppo_epochs", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"{stage}: 1 steps" in res.stdout
    records = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert len(records) == 1 and "kl" in records[0] and "repetition_rate" in records[0]
    assert (out / ("adapter_model.safetensors" if finetuning_type == "lora" else "config.json")).exists()


@pytest.mark.skipif(not (ROOT / "weights/tiny/config.json").exists(), reason="weights/tiny is not built yet")
def test_cli_ppo_rule_reads_the_user_message_of_the_runs_template_and_the_critic_starts_at_zero(tmp_path, monkeypatch):
    import json

    import minitune.rlhf
    from minitune.cli import main
    from minitune.tiny.evaluate import stop_ids

    seen = {}

    def fake_train_ppo(actor, critic, reference, reward, prompts, cfg, stops, pad, **kw):
        seen.update(critic=critic, reward=reward, prompts=prompts, stops=stops)
        return [{"seconds": 0.0, "reward": 0.0, "kl": 0.0}]

    monkeypatch.setattr(minitune.rlhf, "train_ppo", fake_train_ppo)
    data = tmp_path / "prompts.jsonl"
    row = {"instruction": "Reverse the words: sun fish apple", "input": "", "output": "-"}  # PPO samples its own reply
    data.write_text(json.dumps(row) + "\n")
    main(["train", "--stage", "ppo", "--finetuning_type", "lora", "--template", "alpaca", "--model_name_or_path",
          str(ROOT / "weights/tiny"), "--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    tok = minitune.load_pretrained(ROOT / "weights/tiny")[1]
    reply = tok.encode("apple fish sun.") + seen["stops"][:1]
    assert seen["reward"](seen["prompts"][0], reply) == 3.0  # +2 the reversal is right, +1 the full stop
    assert not seen["critic"].value_head.weight.any()  # V = 0 everywhere before the critic learns
    assert seen["stops"] == stop_ids(tok)


@pytest.mark.skipif(not (ROOT / "weights/tiny/config.json").exists(), reason="weights/tiny is not built yet")
def test_cli_rl_stage_names_the_settings_it_does_not_use(tmp_path, monkeypatch, capsys):
    """bf16, a schedule, evaluation...: the trainer's stages read them, PPO/GRPO here do not; the run says so."""
    import json

    import minitune.rlhf
    from minitune.cli import main

    monkeypatch.setattr(minitune.rlhf, "train_grpo", lambda *a, **k: [{"seconds": 0.0, "reward": 0.0, "kl": 0.0}])
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"instruction": "What is 1+2?", "input": "", "output": "3"}) + "\n")
    main(["train", "--stage", "grpo", "--finetuning_type", "lora", "--model_name_or_path", str(ROOT / "weights/tiny"),
          "--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--bf16",
          "--lr_scheduler_type", "linear"])
    err = capsys.readouterr().err
    assert "note: stage grpo does not use bf16, lr_scheduler_type (it trains in float32" in err
