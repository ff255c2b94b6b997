"""Lesson 11: PPO (近端策略优化) with four models. Read README.md beside this file; every number is measured.

    python lessons/11-ppo/run.py                  # the tiny model on CPU, a few minutes
    python lessons/11-ppo/run.py --fast           # CI: tiny sizes (< 60 s)
    python lessons/11-ppo/run.py --sft PATH   # start from your own SFT checkpoint

0. a short SFT of weights/tiny (PPO starts from an instruction-following model), cached for lesson 13;
1. the four models and their memory: here, and for a 7B config from the memory estimator;
2. the reward: the tiny world's preference rule standing in for the reward model;
3. GAE by hand on a 5-token example, beside compute_gae;
4. a healthy run: the preferred behaviour before and after on held-out prompts, and the final KL;
5. the per-token rewards of one response: -beta * KL on every token, the score at the last;
6. a collapsed run: no KL penalty, a high learning rate and a length-biased reward; the warnings.
"""
import copy
import json
import sys
from pathlib import Path

import torch

import minitune
from minitune.classroom.lesson import ROOT, finish, section, sft_start
from minitune.memory import estimate_memory, human_bytes, lora_parameters
from minitune.model import ModelConfig
from minitune.rlhf import (PPOConfig, RewardModel, collapse_stats, collapse_warnings, compute_gae, kl_penalty_rewards, reference_logprobs,
                           response_logprobs, sample_rollout, text_reward, train_ppo)
from minitune.tiny.evaluate import ask, prompt_ids, stop_ids
from minitune.tiny.tasks import preference_score


def parse_args():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "weights" / "tiny"), help="checkpoint folder (default weights/tiny)")
    ap.add_argument("--sft", default=None, help="an SFT checkpoint to start from (default: SFT the model here, "
                                                "cache it in runs/rlhf-sft-<steps>/, shared with lesson 13)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, help="float32 (default) or bfloat16: the dtype of the frozen "
                                                  "reference and reward models; actor and critic train in fp32")
    ap.add_argument("--fast", action="store_true", help="CI mode: a few steps, a few prompts (< 60 s)")
    ap.add_argument("--out", default="runs/lesson-11", help="logs (and the SFT model) go here")
    args = ap.parse_args()
    torch.manual_seed(0)
    return args


args = parse_args()
out = Path(args.out)
FAST = args.fast


# --------------------------------------------------------------------------- 0
section("0. The starting point: an SFT model (RL fine-tunes a model that already follows instructions)")
sft, tok = sft_start(args, 10 if FAST else 450)
sft.eval()
STOPS = stop_ids(tok)
PAD = tok.pad_id if tok.pad_id is not None else STOPS[0]
data_dir = Path(args.model) / "data"
train_questions = [json.loads(x)["instruction"] for x in (data_dir / "sft_alpaca.jsonl").read_text().splitlines()]
eval_rows = [json.loads(x) for x in (data_dir / "eval.jsonl").read_text().splitlines()]
heldout = [r["prompt"] for r in eval_rows][:: 16 if FAST else 3]  # a spread of every task
train_prompts = [prompt_ids(tok, q) for q in train_questions]
ref_dtype = getattr(torch, args.dtype) if args.dtype else torch.float32

# --------------------------------------------------------------------------- 1
section("1. The four models (四个模型) and their memory")
actor = copy.deepcopy(sft)  # pi: trained
critic = RewardModel(copy.deepcopy(sft))  # V: trained; a value head on a copy of the SFT model
reference = copy.deepcopy(sft).to(ref_dtype).requires_grad_(False)  # pi_ref: frozen SFT model
reward = text_reward(preference_score, tok, STOPS)  # RM: the tiny world's rule stands in (see README)
for name, m, role in (("actor", actor, "trained: the policy pi"), ("critic", critic, "trained: values V(s_t)"),
                      ("reference", reference, "frozen: pi_ref, the KL anchor")):
    n = sum(p.numel() for p in m.parameters())
    print(f"  {name:10} {n / 1e6:6.2f} M parameters   {role}")
print("  reward     (a rule)            frozen: preference_score(prompt, response); a trained RewardModel fits the same slot")

cfg7b = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, model_type="llama")
bf16 = torch.bfloat16
full = estimate_memory(cfg7b, "full", bf16)  # a trained model: weights, grads, fp32 master, AdamW moments
lora = estimate_memory(cfg7b, "lora", bf16, lora_r=8)
frozen = full.n_params * 2  # a frozen bf16 model: weights only
trained = full.parameters + full.gradients + full.master_weights + full.optimizer_states
adapter = lora_parameters(cfg7b, 8) * 16  # fp32 weights + grads + AdamW moments of one adapter
print(f"\nA 7B LLaMA-shaped config ({full.n_params / 1e9:.2f} B parameters), bf16 weights, AdamW, "
      f"activations not counted (estimate_memory):")
rows = [("four full models", [("actor (trained)", trained), ("critic (trained)", trained),
                              ("reference (frozen)", frozen), ("reward (frozen)", frozen)]),
        ("LoRA actor + LoRA critic on one frozen base", [
            ("shared frozen base (bf16)", frozen), ("actor LoRA r=8 (trained)", adapter),
            ("critic LoRA r=8 + value head (trained)", adapter), ("reference = base, adapter off", 0.0),
            ("reward (frozen, own weights)", frozen)])]
totals = {}
for title, items in rows:
    print(f"  {title}:")
    for name, b in items:
        print(f"    {name:42} {human_bytes(b):>10}")
    totals[title] = sum(b for _, b in items)
    print(f"    {'total':42} {human_bytes(totals[title]):>10}")
print(f"  -> LoRA needs {totals[rows[1][0]] / totals[rows[0][0]]:.0%} of the four-full-model memory "
      f"({human_bytes(totals[rows[0][0]] - totals[rows[1][0]])} less); one full trained model alone is "
      f"{human_bytes(trained)} (lora estimate for the actor: {human_bytes(lora.total - lora.activations)})")

# --------------------------------------------------------------------------- 2
section("2. The reward (奖励): a rule standing in for the reward model")
for q, a in (("What is 3+4?", "7"), ("What is 3+4?", "7."), ("What is 3+4?", "The answer is 8."),
             ("What is 3+4?", "Whatever. It is 7"), ("What is 3+4?", "")):
    print(f"  preference_score({q!r}, {a!r:22}) = {preference_score(q, a):+.0f}")
shown = heldout[:: max(1, len(heldout) // 6)][:6]
replies = ask(sft, tok, shown)
print("the SFT model's greedy replies to held-out prompts, scored:")
for q, r in zip(shown, replies):
    print(f"  {q!r:44} -> {r!r:34} score {preference_score(q, r):+.0f}")

# --------------------------------------------------------------------------- 3
section("3. GAE by hand (GAE 手算) on a 5-token example")
gamma, lam, beta = 1.0, 0.95, 0.1
logp = torch.tensor([[-1.2, -0.7, -2.0, -0.3, -0.9]])
ref_logp = torch.tensor([[-1.0, -0.9, -1.5, -0.4, -0.9]])
values = torch.tensor([[0.5, 0.6, 0.4, 0.8, 0.9]])
mask = torch.ones(1, 5, dtype=torch.long)
score = torch.tensor([1.0])
r = kl_penalty_rewards(logp, ref_logp, score, mask, beta)
adv, ret = compute_gae(r, values, mask, gamma, lam)
print(f"gamma={gamma}, lambda={lam}, beta={beta}; RM score {score.item()} paid at the last token")
print(f"{'t':>2} {'log pi':>7} {'log ref':>8} {'r_t':>7} {'V_t':>5} {'delta_t = r_t + g V_t+1 - V_t':>31} "
      f"{'A_t = delta_t + g l A_t+1':>27} {'R_t = A_t + V_t':>16}")
a_next, by_hand = 0.0, []
deltas = []
for t in range(5):
    v_next = values[0, t + 1].item() if t < 4 else 0.0  # terminal after the last token
    deltas.append(r[0, t].item() + gamma * v_next - values[0, t].item())
for t in reversed(range(5)):
    a_next = deltas[t] + gamma * lam * a_next
    by_hand.insert(0, a_next)
for t in range(5):
    print(f"{t:>2} {logp[0, t]:7.2f} {ref_logp[0, t]:8.2f} {r[0, t]:7.3f} {values[0, t]:5.2f} {deltas[t]:31.4f} "
          f"{by_hand[t]:27.4f} {by_hand[t] + values[0, t].item():16.4f}")
print(f"compute_gae advantages: {[round(x, 4) for x in adv[0].tolist()]}")
print(f"compute_gae returns:    {[round(x, 4) for x in ret[0].tolist()]}")
print(f"by hand == compute_gae: {torch.allclose(adv[0], torch.tensor(by_hand))}")


# --------------------------------------------------------------------------- 4
def behaviour(model, questions):
    """(rate of replies ending with a full stop, mean preference score, replies) on greedy replies."""
    reps = ask(model, tok, questions)
    stop = sum(x.rstrip().endswith((".", "。")) for x in reps) / len(reps)
    return stop, sum(preference_score(q, x) for q, x in zip(questions, reps)) / len(reps), reps


@torch.no_grad()
def heldout_kl(model, questions, n_samples=2):
    """Sequence KL(pi || pi_ref) on held-out prompts: mean of sum_t (log pi - log pi_ref) over sampled replies."""
    rows = [prompt_ids(tok, q) for q in questions for _ in range(n_samples)]
    roll = sample_rollout(model, rows, 24, STOPS, PAD, seed=1)
    lp, rp = response_logprobs(model, roll), reference_logprobs(reference, model, roll)
    return ((lp - rp) * roll.response_mask).sum(1).mean().item()


section("4. A healthy run (健康的训练): the preferred behaviour rises, the KL stays bounded")
ppo_cfg = PPOConfig(steps=2 if FAST else 20, batch_size=8 if FAST else 16, mini_batch_size=8, ppo_epochs=2,
                    learning_rate=3e-4, init_kl_coef=0.05, max_new_tokens=8 if FAST else 16,
                    log_path=str(out / "ppo_healthy.jsonl"))
print("PPOConfig: " + ", ".join(f"{k}={getattr(ppo_cfg, k)}" for k in (
    "steps", "batch_size", "mini_batch_size", "ppo_epochs", "learning_rate", "init_kl_coef", "gamma", "lam",
    "cliprange", "cliprange_value", "vf_coef", "max_new_tokens")))
stop0, score0, reps0 = behaviour(sft, heldout)
records = train_ppo(actor, critic, reference, reward, train_prompts, ppo_cfg, STOPS, PAD)
stop1, score1, reps1 = behaviour(actor, heldout)
kl_final = heldout_kl(actor, heldout)
print(f"\n{'step':>4} {'reward':>7} {'KL':>6} {'clip':>5} {'entropy':>7} {'length':>6} {'repeat':>6}")
for rec in [records[i] for i in sorted({*range(0, len(records), max(1, len(records) // 8)), len(records) - 1})]:
    print(f"{rec['step']:>4} {rec['reward']:7.3f} {rec['kl']:6.3f} {rec['clip_frac']:5.2f} {rec['entropy']:7.3f} "
          f"{rec['response_length']:6.1f} {rec['repetition_rate']:6.2f}")
print(f"\nheld-out prompts ({len(heldout)}), greedy replies:   before (SFT)   after (PPO)")
print(f"  replies ending with a full stop          {stop0:>10.0%}   {stop1:>10.0%}")
print(f"  mean preference score                    {score0:>10.2f}   {score1:>10.2f}")
print(f"  KL(pi || pi_ref), sampled, nats/reply    {0.0:>10.2f}   {kl_final:>10.2f}")
print(f"warnings during the run: {sum(len(r['warnings']) for r in records)}; log: {ppo_cfg.log_path}")
print("examples (before -> after):")
for q, b, a in list(zip(heldout, reps0, reps1))[:: max(1, len(heldout) // 6)][:6]:
    print(f"  {q!r:44} {b!r:30} -> {a!r}")

# --------------------------------------------------------------------------- 5
section("5. The per-token rewards of one response: -beta * (log pi - log pi_ref), plus the score at the end")
roll = sample_rollout(actor, [prompt_ids(tok, heldout[0])], 24, STOPS, PAD, seed=3)
with torch.no_grad():
    lp, rp = response_logprobs(actor, roll), reference_logprobs(reference, actor, roll)
sc = torch.tensor([reward(prompt_ids(tok, heldout[0]), roll.responses[0][roll.response_mask[0].bool()].tolist())])
rw = kl_penalty_rewards(lp, rp, sc, roll.response_mask, ppo_cfg.init_kl_coef)
print(f"prompt {heldout[0]!r}; score {sc.item():+.0f}; beta {ppo_cfg.init_kl_coef}")
for t in range(int(roll.response_mask.sum())):
    print(f"  {tok.decode([roll.responses[0, t].item()])!r:>16}  log pi {lp[0, t]:6.2f}  log ref {rp[0, t]:6.2f}"
          f"  r_t {rw[0, t]:+.3f}")

# --------------------------------------------------------------------------- 6
section("6. A collapsed run (崩溃): no KL penalty, 100x the learning rate, a reward model that likes length")


def length_biased(prompt, response):
    """A flawed RM: the rule plus 0.3 per word. Real RMs often prefer longer answers; without the
    KL leash the policy finds that saying anything, again and again, pays."""
    return preference_score(prompt, response) + 0.3 * len(response.split())


bad_actor, bad_critic = copy.deepcopy(sft), RewardModel(copy.deepcopy(sft))
bad_cfg = PPOConfig(steps=2 if FAST else 10, batch_size=8 if FAST else 16, mini_batch_size=8, ppo_epochs=4,
                    learning_rate=1e-2, init_kl_coef=0.0, max_new_tokens=8 if FAST else 16,
                    log_path=str(out / "ppo_collapsed.jsonl"))
print(f"PPOConfig: init_kl_coef={bad_cfg.init_kl_coef}, learning_rate={bad_cfg.learning_rate}, "
      f"ppo_epochs={bad_cfg.ppo_epochs}, steps={bad_cfg.steps}; warnings print as they fire:")
bad = train_ppo(bad_actor, bad_critic, reference, text_reward(length_biased, tok, STOPS), train_prompts, bad_cfg,
                STOPS, PAD)
stop2, score2, reps2 = behaviour(bad_actor, heldout)
print(f"\n{'step':>4} {'reward':>7} {'KL':>7} {'length':>6} {'repeat':>6}  warnings")
for rec in bad:
    print(f"{rec['step']:>4} {rec['reward']:7.2f} {rec['kl']:7.2f} {rec['response_length']:6.1f} "
          f"{rec['repetition_rate']:6.2f}  {len(rec['warnings'])}")
print(f"after: replies ending with a full stop {stop2:.0%}, mean (true) preference score {score2:.2f}, "
      f"KL {heldout_kl(bad_actor, heldout):.2f}")
for q, a in list(zip(heldout, reps2))[:3]:
    print(f"  {q!r:44} -> {a!r}")
print(f"steps with a collapse warning during training: {sum(bool(r['warnings']) for r in bad)} of {len(bad)}")
# The same watch on the trained models' greedy replies to the held-out prompts:
for name, reps in (("healthy", reps1), ("collapsed", reps2)):
    ids = [tok.encode(x)[:24] or [STOPS[0]] for x in reps]
    width = max(map(len, ids))
    stats = collapse_stats(torch.tensor([x + [PAD] * (width - len(x)) for x in ids]),
                           torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]))
    found = collapse_warnings(stats)
    print(f"{name} model, held-out replies: length {stats['response_length']:.1f} tokens, repetition "
          f"{stats['repetition_rate']:.2f} -> " + ("no warning" if not found else ""))
    for w in found:
        print(f"  WARNING {w}")
finish()
