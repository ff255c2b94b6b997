"""Lesson 11: PPO (近端策略优化) with four models. Read README.md beside this file; every number is measured.

    python lessons/11-ppo/run.py                  # the tiny model on CPU, about 2 minutes (1 thread)
    python lessons/11-ppo/run.py --fast           # CI: tiny sizes (< 60 s)
    python lessons/11-ppo/run.py --sft PATH       # start from your own SFT checkpoint
    python lessons/11-ppo/run.py --seed 1         # another draw of prompts and samples

1. the four models, starting from the SFT of weights/tiny (cached for lessons 12 and 13), and their memory:
   here, and for a 7B config from the memory estimator;
2. the reward: the tiny world's preference rule standing in for the reward model; where its signal is;
3. GAE by hand on a 5-token example, beside compute_gae;
4. the PPO step's settings, the prompts it rolls out and the prompts it is measured on;
5. a healthy run: the preferred behaviour before and after on held-out prompts, the final KL, and the
   per-token rewards of one response (-beta * KL on every token, the score at the last);
6. a collapsed run: no KL penalty, a high learning rate and a length-biased reward; the warnings.
"""
import argparse
import copy
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from minitune.classroom.claims import claim, finish_claims, not_checked
from minitune.classroom.lesson import ROOT, finish, section, sft_start, small_model_threads
from minitune.memory import estimate_memory, human_bytes, lora_parameters
from minitune.model import ModelConfig
from minitune.rlhf import (PPOConfig, RewardModel, collapse_stats, collapse_warnings, compute_gae, kl_penalty_rewards,
                           reference_logprobs, response_kl, response_logprobs, sample_rollout, score_responses,
                           text_reward, train_ppo)
from minitune.tiny.evaluate import ask, prompt_ids, stop_ids
from minitune.tiny.general_suite import general_ability
from minitune.tiny.tasks import contains_answer, preference_score, reference_answer

LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, model_type="llama")
TASKS = {"arithmetic": "sums", "reversal": "word reversal", "fact": "capitals, colours", "identity": "identity (no answer)"}
# the held-out phrasings of lesson 05's evaluation set, asked of every sum
NEW_WORDING = ("How much is {a} plus {b}?", "Tell me the sum of {a} and {b}.")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "weights" / "tiny"), help="checkpoint folder (default weights/tiny)")
    ap.add_argument("--sft", default=None, help="an SFT checkpoint to start from (default: SFT the model here, "
                                                "cache it in runs/rlhf-sft-<steps>/, shared with lesson 13)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, help="float32 (default) or bfloat16: the dtype of the frozen "
                                                  "reference and reward models; actor and critic train in fp32")
    ap.add_argument("--fast", action="store_true", help="CI mode: a few steps, a few prompts (< 60 s)")
    ap.add_argument("--out", default="runs/lesson-11", help="the PPO logs go here")
    ap.add_argument("--seed", type=int, default=0, help="PPOConfig.seed of the healthy run (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 for models under 50M "
                    "parameters, whose small matrices gain nothing from a second thread; else torch's default)")
    args = ap.parse_args()
    torch.manual_seed(0)
    return args


def pad_id(tok) -> int:
    return tok.pad_id if tok.pad_id is not None else stop_ids(tok)[0]


def task_of(question: str) -> str:
    """Which of TASKS a question belongs to, read from its reference answer."""
    answer = reference_answer(question)
    return ("identity" if answer is None else "arithmetic" if answer.isdigit()
            else "reversal" if re.search(r"words", question) else "fact")


# --------------------------------------------------------------------------- 1
def four_models(args):
    """Section 1: actor, critic, reference and reward, all from the SFT model, and what four models cost at
    7B. Returns (SFT model, tokenizer, actor, critic, reference, reward)."""
    section("1. The four models (四个模型), starting from an SFT model, and their memory")
    sft, tok = sft_start(args, 10 if args.fast else 450)  # RL fine-tunes a model that already follows instructions
    sft.eval()
    ref_dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    actor = copy.deepcopy(sft)  # pi: trained
    critic = RewardModel(copy.deepcopy(sft), init_std=0.0)  # V: trained; a zero value head on a copy of the SFT model
    reference = copy.deepcopy(sft).to(ref_dtype).requires_grad_(False)  # pi_ref: frozen SFT model
    reward = text_reward(preference_score, tok, stop_ids(tok))  # RM: the tiny world's rule stands in (see README)
    for name, m, role in (("actor", actor, "trained: the policy pi"), ("critic", critic, "trained: values V(s_t)"),
                          ("reference", reference, "frozen: pi_ref, the KL anchor")):
        n = sum(p.numel() for p in m.parameters())
        print(f"  {name:10} {n / 1e6:6.2f} M parameters   {role}")
    print("  reward     (a rule)            frozen: preference_score(prompt, response); a trained RewardModel fits "
          "the same slot")
    memory_at_7b()
    return sft, tok, actor, critic, reference, reward


def memory_at_7b() -> None:
    """Four full models against LoRA adapters on one shared frozen base, for a 7B config (estimate_memory)."""
    bf16 = torch.bfloat16
    full = estimate_memory(LLAMA_7B, "full", bf16)  # a trained model: weights, grads, fp32 master, AdamW moments
    lora = estimate_memory(LLAMA_7B, "lora", bf16, lora_r=8)
    frozen = full.n_params * 2  # a frozen bf16 model: weights only
    trained = full.parameters + full.gradients + full.master_weights + full.optimizer_states
    adapter = lora_parameters(LLAMA_7B, 8) * 16  # fp32 weights + grads + AdamW moments of one adapter
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
def where_the_signal_is(args, sft, tok, reward, train_questions, eval_rows) -> None:
    """Section 2: what the rule pays, and per task how often two samples score differently (only then is
    there something to reinforce); the full stop's probability after a greedy answer."""
    section("2. The reward (奖励): a rule standing in for the reward model, and where its signal is")
    for q, a in (("What is 3+4?", "7"), ("What is 3+4?", "7."), ("What is 3+4?", "The answer is 8."),
                 ("What is 3+4?", "Whatever. It is 7"), ("What is 3+4?", "")):
        print(f"  preference_score({q!r}, {a!r:22}) = {preference_score(q, a):+.0f}")
    # Two samples of every training question at temperature 1, as PPO's rollouts are drawn: a question
    # whose samples score differently carries a signal; one whose samples always score the same has none.
    stops = stop_ids(tok)
    questions = train_questions[::8] if args.fast else train_questions
    roll = sample_rollout(sft, [prompt_ids(tok, q) for q in questions for _ in range(2)], 16, stops, pad_id(tok),
                          seed=5)
    scores = score_responses(reward, roll).view(-1, 2)
    texts = [tok.decode([t for t, m in zip(r, k) if m and t not in stops], skip_special_tokens=True).strip()
             for r, k in zip(roll.responses.tolist(), roll.response_mask.tolist())]
    by_task = defaultdict(list)
    for i, q in enumerate(questions):
        by_task[task_of(q)].append((scores[i].mean().item(), float(scores[i, 0] != scores[i, 1]),
                                    float(texts[2 * i].endswith((".", "。")))))
    print(f"\nthe SFT model's sampled replies to the {len(questions)} training questions, 2 each, by task:")
    print(f"  {'task':24} {'questions':>9} {'mean score':>10} {'the 2 samples differ':>21} {'ends with a full stop':>22}")
    for task, name in TASKS.items():
        rows = by_task[task]
        print(f"  {name:24} {len(rows):>9} {sum(r[0] for r in rows) / len(rows):>10.2f} "
              f"{sum(r[1] for r in rows) / len(rows):>21.0%} {sum(r[2] for r in rows) / len(rows):>22.0%}")
    shown = [r["prompt"] for r in eval_rows if r["task"] in ("arithmetic", "reversal")][::12][:4]
    dot = tok.encode(".")[0]
    print("the SFT model's greedy replies to held-out prompts, and its probability of a full stop right after them:")
    with torch.no_grad():
        for q, r in zip(shown, ask(sft, tok, shown)):
            ids = prompt_ids(tok, q) + tok.encode(r)
            p_dot = torch.softmax(sft(torch.tensor([ids], device=args.device))[0, -1].float(), -1)[dot].item()
            print(f"  {q!r:52} -> {r!r:16} score {preference_score(q, r):+.0f}, P('.' next) = {p_dot:.1e}")


# --------------------------------------------------------------------------- 3
def gae_by_hand() -> None:
    """Section 3: KL-penalised rewards, TD errors, advantages and returns of 5 tokens, beside compute_gae."""
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
    gap = (adv[0] - torch.tensor(by_hand)).abs().max()
    claim("compute_gae gives the advantages computed by hand, backwards from the last token",
          torch.allclose(adv[0], torch.tensor(by_hand)), f"max |diff| {gap:.1e}")


# --------------------------------------------------------------------------- 4
def ppo_step(args, tok, train_questions, eval_rows):
    """Section 4: the healthy run's PPOConfig, the prompts it rolls out (the training sums, where section 2
    found a signal) and the held-out prompts it is measured on. Returns (config, rollout prompts,
    {name: questions} of the measured sets, the other tasks' held-out rows)."""
    section("4. The PPO step (PPO 更新): its settings, the prompts it rolls out, the prompts it is measured on")
    cfg = PPOConfig(steps=2 if args.fast else 40, batch_size=16 if args.fast else 64,
                    mini_batch_size=8 if args.fast else 32, ppo_epochs=2, learning_rate=1e-4, critic_learning_rate=1e-3,
                    init_kl_coef=0.05, max_new_tokens=8, seed=args.seed, log_path=str(Path(args.out) / "ppo_healthy.jsonl"))
    print("PPOConfig: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in (
        "steps", "batch_size", "mini_batch_size", "ppo_epochs", "learning_rate", "critic_learning_rate", "init_kl_coef",
        "gamma", "lam", "cliprange", "cliprange_value", "vf_coef", "max_new_tokens", "seed")))
    # Measured on prompts never trained on: every sum asked in eval.jsonl's two held-out phrasings, for the training
    # sums (new wording, known facts) and for eval.jsonl's held-out sums (new wording, number pairs SFT and PPO never
    # asked about).
    train_sums = [prompt_ids(tok, q) for q in train_questions if task_of(q) == "arithmetic"]
    train_pairs = [tuple(map(int, re.findall(r"\d+", q))) for q in train_questions if task_of(q) == "arithmetic"]
    held_pairs = [tuple(map(int, re.findall(r"\d+", r["prompt"]))) for r in eval_rows if r["task"] == "arithmetic"]
    known = [w.format(a=a, b=b) for a, b in train_pairs[:: 8 if args.fast else 1] for w in NEW_WORDING]
    heldout = [w.format(a=a, b=b) for a, b in held_pairs[:: 3 if args.fast else 1] for w in NEW_WORDING]
    sets = {"training sums, held-out wording": known, "held-out sums, held-out wording": heldout}
    others = [r for r in eval_rows if r["task"] != "arithmetic" and reference_answer(r["prompt"]) is not None]
    others = others[:: 8 if args.fast else 1]
    print(f"rollouts: the {len(train_sums)} training sums; measured on "
          + ", ".join(f"{name} ({len(qs)} questions)" for name, qs in sets.items())
          + f", {len(others)} held-out questions of the other tasks")
    return cfg, train_sums, sets, others


# --------------------------------------------------------------------------- 5
def behaviour(model, tok, reward, questions, n_samples=4):
    """Greedy replies: (correct rate, full-stop rate, mean preference score, replies); plus the correct rate of
    n_samples sampled replies per question at temperature 1 (the policy PPO trains)."""
    reps = ask(model, tok, questions, max_new_tokens=8)
    correct = sum(contains_answer(x, reference_answer(q)) for q, x in zip(questions, reps)) / len(reps)
    stop = sum(x.rstrip().endswith((".", "。")) for x in reps) / len(reps)
    score = sum(preference_score(q, x) for q, x in zip(questions, reps)) / len(reps)
    roll = sample_rollout(model, [prompt_ids(tok, q) for q in questions for _ in range(n_samples)], 8, stop_ids(tok),
                          pad_id(tok), seed=2)
    sampled = (score_responses(reward, roll) >= 2).float().mean().item()  # +2 = the right answer
    return correct, stop, score, sampled, reps


def other_tasks_correct(model, tok, others) -> float:
    reps = ask(model, tok, [r["prompt"] for r in others])
    return sum(contains_answer(x, r["answer"]) for r, x in zip(others, reps)) / len(others)


def general_suite(model, tok, fast: bool) -> float:
    """The tiny world's general-ability suite (minitune/tiny/general_suite.py, lesson 05's alignment tax): 88
    four-choice questions no stage trains on, each option scored by its log-likelihood. --fast: 3 per subject."""
    return general_ability(model, tok, per_subject_limit=3 if fast else None)


def heldout_kl(model, reference, tok, questions, n_samples=4, max_new_tokens=8) -> float:
    """Sequence KL(pi || pi_ref) on held-out prompts: log pi - log pi_ref summed over each sampled reply, averaged
    (minitune.rlhf.response_kl, lesson 12's measure; one batch, so one seeded draw of all the samples)."""
    rows = [prompt_ids(tok, q) for q in questions for _ in range(n_samples)]
    kl = response_kl(model, reference, rows, stop_ids(tok), pad_id(tok), max_new_tokens=max_new_tokens, seed=1,
                     batch_size=len(rows))
    return kl["kl_per_sequence"]


def healthy_run(args, sft, tok, actor, critic, reference, reward, cfg, train_sums, sets, others) -> None:
    """Section 5: PPO on the training sums; the step table, the measured sets before and after, the KL to the
    reference, the replies that changed, and one response's rewards token by token. Returns what the claims
    check: {"before", "after", "others", "kl", "rewards", "warnings"}."""
    section("5. A healthy run (健康的训练): the preferred behaviour rises, the KL stays bounded")
    stops, pad = stop_ids(tok), pad_id(tok)
    before = {name: behaviour(sft, tok, reward, qs) for name, qs in sets.items()}
    others0 = other_tasks_correct(sft, tok, others)
    suite0 = general_suite(sft, tok, args.fast)
    records = train_ppo(actor, critic, reference, reward, train_sums, cfg, stops, pad)
    after = {name: behaviour(actor, tok, reward, qs) for name, qs in sets.items()}
    others1 = other_tasks_correct(actor, tok, others)
    suite1 = general_suite(actor, tok, args.fast)
    heldout = sets["held-out sums, held-out wording"]
    kl_final = heldout_kl(actor, reference, tok, heldout)
    print(f"\n{'step':>4} {'reward':>7} {'KL':>6} {'clip':>5} {'entropy':>7} {'value loss':>10} {'length':>6} {'repeat':>6}")
    for rec in [records[i] for i in sorted({*range(0, len(records), max(1, len(records) // 8)), len(records) - 1})]:
        print(f"{rec['step']:>4} {rec['reward']:7.3f} {rec['kl']:6.3f} {rec['clip_frac']:5.2f} {rec['entropy']:7.3f} "
              f"{rec['value_loss']:10.3f} {rec['response_length']:6.1f} {rec['repetition_rate']:6.2f}")
    quarter = max(1, len(records) // 4)
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (records[:quarter], records[-quarter:]))
    print(f"mean rollout reward of the first {quarter} steps {first:.3f}, of the last {quarter} steps {last:.3f}")
    print(f"\n{'':49}before (SFT)   after (PPO)")
    for name, qs in sets.items():
        (c0, s0, p0, q0, _), (c1, s1, p1, q1, _) = before[name], after[name]
        print(f"{name} ({len(qs)} questions)")
        print(f"  greedy replies with the right answer           {c0:>10.0%}   {c1:>10.0%}")
        print(f"  sampled replies with the right answer (4 each) {q0:>10.0%}   {q1:>10.0%}")
        print(f"  greedy replies ending with a full stop         {s0:>10.0%}   {s1:>10.0%}")
        print(f"  mean preference score, greedy                  {p0:>10.2f}   {p1:>10.2f}")
    print(f"KL(pi || pi_ref) on held-out sums, sampled, nats per reply {0.0:.2f} -> {kl_final:.2f}")
    print(f"other held-out tasks ({len(others)} questions), right answer {others0:.0%} -> {others1:.0%}")
    print(f"general-ability suite (alignment tax, 对齐税): {suite0:.1%} -> {suite1:.1%} (the SFT start -> after PPO; "
          f"the base model before SFT: lesson 05)")
    reps0, reps1 = before[name][-1], after[name][-1]  # the held-out sums
    print(f"warnings during the run: {sum(len(r['warnings']) for r in records)}; log: {cfg.log_path}")
    changed = [(q, b, a) for q, b, a in zip(heldout, reps0, reps1) if b != a]
    right = [contains_answer(a, reference_answer(q)) for q, _, a in changed]
    wrong = [contains_answer(b, reference_answer(q)) for q, b, _ in changed]
    print(f"{len(changed)} of {len(heldout)} greedy replies changed: {sum(right)} became right, {sum(wrong)} became "
          f"wrong, {len(changed) - sum(right) - sum(wrong)} stayed wrong; the first six (before -> after):")
    for q, b, a in changed[:6]:
        print(f"  {q!r:40} {b!r:8} -> {a!r}")
    per_token_rewards(actor, reference, tok, reward, heldout[0], cfg.init_kl_coef)
    return dict(before=before, after=after, others=(others0, others1), kl=kl_final, rewards=(first, last),
                warnings=sum(len(r["warnings"]) for r in records), suite=(suite0, suite1))


def per_token_rewards(actor, reference, tok, reward, question: str, beta: float) -> None:
    """One sampled response, token by token: -beta * (log pi - log pi_ref) on every token, the score on the last."""
    print("\nthe per-token rewards of one response: -beta * (log pi - log pi_ref), plus the score at the end")
    roll = sample_rollout(actor, [prompt_ids(tok, question)], 24, stop_ids(tok), pad_id(tok), seed=3)
    with torch.no_grad():
        lp, rp = response_logprobs(actor, roll), reference_logprobs(reference, actor, roll)
    sc = torch.tensor([reward(prompt_ids(tok, question), roll.responses[0][roll.response_mask[0].bool()].tolist())])
    rw = kl_penalty_rewards(lp, rp, sc, roll.response_mask, beta)
    print(f"prompt {question!r}; score {sc.item():+.0f}; beta {beta}")
    for t in range(int(roll.response_mask.sum())):
        print(f"  {tok.decode([roll.responses[0, t].item()])!r:>16}  log pi {lp[0, t]:6.2f}  log ref {rp[0, t]:6.2f}"
              f"  r_t {rw[0, t]:+.3f}")


# --------------------------------------------------------------------------- 6
def length_biased(prompt, response):
    """A flawed RM: the rule plus 0.3 per word. Real RMs often prefer longer answers; without the
    KL leash the policy finds that saying anything, again and again, pays."""
    return preference_score(prompt, response) + 0.3 * len(response.split())


def collapsed_run(args, sft, tok, actor, reference, train_questions, eval_rows) -> None:
    """Section 6: no KL penalty, 30x the learning rate and a length-loving RM; the collapse watch fires during
    training, and the same watch on the healthy and the collapsed model's held-out replies. Returns what the claims
    check: {"kl", "healthy_kl" (the healthy actor, the same prompts and sampling), "score", "warned_steps", "steps"}."""
    section("6. A collapsed run (崩溃): no KL penalty, 30x the learning rate, a reward model that likes length")
    stops, pad = stop_ids(tok), pad_id(tok)
    bad_actor, bad_critic = copy.deepcopy(sft), RewardModel(copy.deepcopy(sft), init_std=0.0)
    bad_cfg = PPOConfig(steps=2 if args.fast else 10, batch_size=8 if args.fast else 16, mini_batch_size=8,
                        ppo_epochs=4, learning_rate=3e-3, init_kl_coef=0.0, max_new_tokens=8 if args.fast else 16,
                        log_path=str(Path(args.out) / "ppo_collapsed.jsonl"))
    print(f"PPOConfig: init_kl_coef={bad_cfg.init_kl_coef}, learning_rate={bad_cfg.learning_rate}, "
          f"ppo_epochs={bad_cfg.ppo_epochs}, steps={bad_cfg.steps}; warnings print as they fire:")
    train_prompts = [prompt_ids(tok, q) for q in train_questions]
    bad = train_ppo(bad_actor, bad_critic, reference, text_reward(length_biased, tok, stops), train_prompts, bad_cfg,
                    stops, pad)
    spread = [r["prompt"] for r in eval_rows][:: 16 if args.fast else 3]  # held-out prompts of every task
    reps2 = ask(bad_actor, tok, spread)
    stop2 = sum(x.rstrip().endswith((".", "。")) for x in reps2) / len(reps2)
    score2 = sum(preference_score(q, x) for q, x in zip(spread, reps2)) / len(reps2)
    print(f"\n{'step':>4} {'reward':>7} {'KL':>7} {'length':>6} {'repeat':>6}  warnings")
    for rec in bad:
        print(f"{rec['step']:>4} {rec['reward']:7.2f} {rec['kl']:7.2f} {rec['response_length']:6.1f} "
              f"{rec['repetition_rate']:6.2f}  {len(rec['warnings'])}")
    kl = heldout_kl(bad_actor, reference, tok, spread, n_samples=2, max_new_tokens=24)
    healthy_kl = heldout_kl(actor, reference, tok, spread, n_samples=2, max_new_tokens=24)
    print(f"after, on {len(spread)} held-out prompts of every task: replies ending with a full stop {stop2:.0%}, mean "
          f"(true) preference score {score2:.2f}, KL {kl:.2f} (the healthy run's on the same prompts: "
          f"{healthy_kl:.2f})")
    for q, a in list(zip(spread, reps2))[:3]:
        print(f"  {q!r:44} -> {a!r}")
    print(f"steps with a collapse warning during training: {sum(bool(r['warnings']) for r in bad)} of {len(bad)}")
    suite2 = general_suite(bad_actor, tok, args.fast)
    print(f"general-ability suite (alignment tax): {general_suite(sft, tok, args.fast):.1%} -> {suite2:.1%} "
          "(the SFT start -> the collapsed model)")
    # The same watch on the trained models' greedy replies to those held-out prompts:
    for name, reps in (("healthy", ask(actor, tok, spread)), ("collapsed", reps2)):
        ids = [tok.encode(x)[:24] or [stops[0]] for x in reps]
        width = max(map(len, ids))
        stats = collapse_stats(torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
                               torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]))
        found = collapse_warnings(stats)
        print(f"{name} model, held-out replies: length {stats['response_length']:.1f} tokens, repetition "
              f"{stats['repetition_rate']:.2f} -> " + ("no warning" if not found else ""))
        for w in found:
            print(f"  WARNING {w}")
    return dict(kl=kl, healthy_kl=healthy_kl, score=score2, warned_steps=sum(bool(r["warnings"]) for r in bad),
                steps=len(bad), suite=suite2)


def ppo_claims(healthy, collapsed, fast: bool) -> None:
    """Sections 5 and 6's findings, with margins that held over seeds 0-2 and 1-2 threads (the README gives the
    range). behaviour() tuples: (right answer, full stop, preference score, sampled right answer, replies)."""
    texts = ["the healthy run's rollout reward rises: the last quarter of the steps beats the first by at least 0.1",
             "sampled replies to the training sums, asked in held-out wording, are right at least 5 points more often",
             "the full stop stays rare (at most 5% of greedy replies): the rule's signal for it is too weak to find",
             "the other tasks are left alone: their right answers move by at most 5 points",
             "the healthy run stays near the reference: KL below 2 nats per reply, and no collapse warning",
             "the collapsed PPO run's KL exceeds the healthy one's at least tenfold, on the same held-out prompts",
             "the collapse watch fires on at least half of the collapsed run's steps",
             "the collapsed model's replies lose the true preference score: mean below 0.2"]
    if fast:
        not_checked(texts)
        return
    known, held = "training sums, held-out wording", "held-out sums, held-out wording"
    b, a = healthy["before"], healthy["after"]
    first, last = healthy["rewards"]
    claim(texts[0], last - first >= 0.1, f"{first:.3f} -> {last:.3f}")
    claim(texts[1], a[known][3] - b[known][3] >= 0.05, f"{b[known][3]:.0%} -> {a[known][3]:.0%}")
    stops = max(a[known][1], a[held][1])
    claim(texts[2], stops <= 0.05, f"{b[known][1]:.0%} -> {a[known][1]:.0%} (training sums), "
                                   f"{b[held][1]:.0%} -> {a[held][1]:.0%} (held-out sums)")
    o0, o1 = healthy["others"]
    claim(texts[3], abs(o1 - o0) <= 0.05, f"{o0:.0%} -> {o1:.0%}")
    claim(texts[4], healthy["kl"] < 2 and healthy["warnings"] == 0,
          f"KL {healthy['kl']:.2f}; {healthy['warnings']} warnings")
    claim(texts[5], collapsed["kl"] >= 10 * collapsed["healthy_kl"],
          f"{collapsed['kl']:.2f} vs {collapsed['healthy_kl']:.2f} nats per reply")
    claim(texts[6], collapsed["warned_steps"] >= collapsed["steps"] / 2,
          f"{collapsed['warned_steps']} of {collapsed['steps']} steps")
    claim(texts[7], collapsed["score"] < 0.2, f"{collapsed['score']:.2f}")


def alignment_tax_claims(healthy, collapsed, fast: bool) -> None:
    """The general-ability suite (lesson 05's alignment tax) after each run, margins from seeds 0-2 (README)."""
    texts = ["the healthy run adds little alignment tax to SFT's: the general-ability suite moves by at most 8 points",
             "the collapsed run costs more general ability: its suite ends at least 2 points below the healthy run's"]
    if fast:
        not_checked(texts)
        return
    (s0, s1), s2 = healthy["suite"], collapsed["suite"]
    claim(texts[0], abs(s1 - s0) <= 0.08, f"{s0:.1%} -> {s1:.1%}")
    claim(texts[1], s1 - s2 >= 0.02, f"collapsed {s2:.1%} vs healthy {s1:.1%}")


def main():
    args = parse_args()
    small_model_threads(args)
    sft, tok, actor, critic, reference, reward = four_models(args)
    data_dir = Path(args.model) / "data"
    train_questions = [json.loads(x)["instruction"] for x in (data_dir / "sft_alpaca.jsonl").read_text().splitlines()]
    eval_rows = [json.loads(x) for x in (data_dir / "eval.jsonl").read_text().splitlines()]
    where_the_signal_is(args, sft, tok, reward, train_questions, eval_rows)
    gae_by_hand()
    cfg, train_sums, sets, others = ppo_step(args, tok, train_questions, eval_rows)
    healthy = healthy_run(args, sft, tok, actor, critic, reference, reward, cfg, train_sums, sets, others)
    collapsed = collapsed_run(args, sft, tok, actor, reference, train_questions, eval_rows)
    finish("11")
    ppo_claims(healthy, collapsed, args.fast)
    alignment_tax_claims(healthy, collapsed, args.fast)
    finish_claims(args.fast, args.model)


if __name__ == "__main__":
    main()
