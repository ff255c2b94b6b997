"""Where a PPO or GRPO step spends its time: generation, scoring, training; the decode path switched.

    python bench/bench_rl_split_gpu.py [--algos ppo,grpo] [--decodes plain,static,graph] [--prompt 64]
                                       [--new-tokens 128] [--warmup 1] [--steps 2] [--json rl_split.json]
    python bench/bench_rl_split_gpu.py --smoke    # CPU, a 2-block tiny shape, seconds (tests/test_bench_gpu_smoke.py)

A step of either algorithm (minitune.rlhf: ppo_step, grpo_step, run unchanged) is three phases:

    generation  sample_rollout -> generate: the actor writes B responses of up to --new-tokens tokens
    scoring     no-grad forwards over prompt + response: old log-probs, the reference's (the actor with its
                LoRA off), the critic's values (PPO), the reward (a reward model for PPO, a rule for GRPO)
    training    the updates: forward + backward + AdamW over minibatches (PPO: ppo_epochs passes,
                actor and critic; GRPO: num_iterations passes, the actor)

The model is a random Qwen2.5-0.5B shape in bf16 (built in memory), LoRA r=16 on all its linear layers
for the actor (and the critic's backbone, whose value head trains whole); the reward model is a second
random backbone. The benchmark times each phase by wrapping, for the step's duration only, the functions
the step calls: `generate` inside rollout.py, and the scoring helpers the step module imported
(response_logprobs, reference_logprobs, critic_values, score_responses) when called without gradients;
each wrapper synchronises the GPU so the work it launched is counted in its phase. training = step - both.

--decodes picks how rollouts are generated, each a run of its own with the same seeds:

    plain   generate(...) as sample_rollout calls it: the loop lesson 03 reads, dynamic KV cache
    static  generate(..., static_cache=cache): a pre-allocated cache (model/static_cache.py), reused by
            every step, and a fixed-shape decode step run eagerly
    graph   the same with cuda_graph=True: that step captured as a CUDA graph once and replayed per token
            (CUDA only). The LoRA weights the optimizer updates are updated in place, so the graph reads
            the current ones.

Per step: seconds in each phase, their shares, and generated tokens/s (B x response columns /
generation seconds); medians over the --steps after --warmup. Machine, driver and versions go to
stdout and with every row to --json (rewritten after each row). Without CUDA it exits with code 2
unless --smoke (fp32 on the CPU, plain and static decoding).
"""

import argparse
import copy
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, however this file is run
from bench_decode_gpu import COMMON, SHAPES, machine_info, sync, write_json  # noqa: E402

import minitune.rlhf.grpo as grpo_module  # noqa: E402
import minitune.rlhf.ppo_trainer as ppo_module  # noqa: E402
import minitune.rlhf.rollout as rollout_module  # noqa: E402
from minitune.model import ModelConfig, StaticKVCache, Transformer  # noqa: E402
from minitune.peft.lora import apply_lora  # noqa: E402
from minitune.rlhf import FixedKLController, GRPOConfig, PPOConfig, RewardModel, grpo_step, ppo_step  # noqa: E402
from minitune.train import make_optimizer  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCORING = ("response_logprobs", "reference_logprobs", "critic_values", "score_responses")


class PhaseClock:
    """Seconds spent in generation and in scoring during one step (GPU synchronised at each boundary)."""

    def __init__(self, device):
        self.device, self.generation, self.scoring = device, 0.0, 0.0

    def timed(self, fn, phase: str, only_without_grad: bool = False):
        def wrapper(*args, **kwargs):
            if only_without_grad and torch.is_grad_enabled():
                return fn(*args, **kwargs)  # a training forward: part of the training phase
            sync(self.device)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            setattr(self, phase, getattr(self, phase) + time.perf_counter() - t)
            return out
        return wrapper


@contextmanager
def patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def decode_with(decode: str, caches: dict):
    """A stand-in for rollout.generate that decodes with `decode`; static caches are kept in `caches`."""
    generate = rollout_module.generate

    def gen(model, ids, max_new_tokens, **kwargs):
        if decode == "plain":
            return generate(model, ids, max_new_tokens, **kwargs)
        B, T = ids.shape
        cache = caches.get(B)
        if cache is None or cache.max_len < T + max_new_tokens:
            cache = caches[B] = StaticKVCache.for_model(model, B, T + max_new_tokens)
        return generate(model, ids, max_new_tokens, static_cache=cache, cuda_graph=decode == "graph", **kwargs)
    return gen


@contextmanager
def phase_timing(clock: PhaseClock, decode: str, caches: dict):
    with ExitStack() as stack:
        stack.enter_context(patched(rollout_module, "generate", clock.timed(decode_with(decode, caches), "generation")))
        for module in (ppo_module, grpo_module):
            for name in SCORING:
                if hasattr(module, name):
                    stack.enter_context(patched(module, name, clock.timed(getattr(module, name), "scoring", True)))
        yield


def build(cfg: ModelConfig, device, dtype, seed: int) -> Transformer:
    torch.manual_seed(seed)
    with torch.device(device):
        return Transformer(cfg).to(dtype)


def with_lora(model, r):
    apply_lora(model, r=r, alpha=2 * r, targets=TARGETS)
    return model


def make_ppo(cfg, args, device, dtype):
    base = build(cfg, device, dtype, 0)
    critic = RewardModel(with_lora(copy.deepcopy(base), args.r), init_std=0.0)  # V = 0 at the start, as PPO's critic
    critic.value_head.requires_grad_(True)
    reward = RewardModel(build(cfg, device, dtype, 1)).eval().requires_grad_(False)
    actor = with_lora(base, args.r)
    ppo_cfg = PPOConfig(batch_size=args.batch, mini_batch_size=args.mini_batch, ppo_epochs=args.ppo_epochs,
                        learning_rate=1e-5, max_new_tokens=args.new_tokens, warn=False)
    opt_a, opt_c = make_optimizer(actor, ppo_cfg.learning_rate), make_optimizer(critic, ppo_cfg.learning_rate)
    kl = FixedKLController(ppo_cfg.init_kl_coef)
    actor.train(), critic.train()

    def step(prompts, i):
        return ppo_step(actor, critic, None, reward, opt_a, opt_c, prompts, ppo_cfg, kl, [cfg.eos_token_id],
                        cfg.eos_token_id, i)
    return step, args.batch


def even_tokens(prompt_ids, response_ids) -> float:
    """A rule reward (GRPO's usual kind): the share of even token ids. Its value is not the point here."""
    return sum(t % 2 == 0 for t in response_ids) / max(len(response_ids), 1)


def make_grpo(cfg, args, device, dtype):
    actor = with_lora(build(cfg, device, dtype, 0), args.r)
    n_prompts = args.batch // args.group
    grpo_cfg = GRPOConfig(batch_size=n_prompts, num_generations=args.group, mini_batch_size=args.mini_batch,
                          learning_rate=1e-5, max_new_tokens=args.new_tokens, warn=False)
    opt = make_optimizer(actor, grpo_cfg.learning_rate)
    actor.train()

    def step(prompts, i):
        return grpo_step(actor, None, even_tokens, opt, prompts, grpo_cfg, [cfg.eos_token_id], cfg.eos_token_id, i)
    return step, n_prompts


def measure(algo, decode, cfg, args, device, dtype):
    step, n_prompts = (make_ppo if algo == "ppo" else make_grpo)(cfg, args, device, dtype)
    gen = torch.Generator().manual_seed(0)
    clock, caches, steps = PhaseClock(device), {}, []
    with phase_timing(clock, decode, caches):
        for i in range(args.warmup + args.steps):
            prompts = torch.randint(3, cfg.vocab_size, (n_prompts, args.prompt), generator=gen).tolist()
            clock.generation = clock.scoring = 0.0
            sync(device)
            t = time.perf_counter()
            stats = step(prompts, i)
            sync(device)
            total = time.perf_counter() - t
            tokens = args.batch * args.new_tokens  # columns generated (rows that stop early pad to the end)
            steps.append(dict(total_s=total, generation_s=clock.generation, scoring_s=clock.scoring,
                              training_s=total - clock.generation - clock.scoring, response_length=stats.get("response_length"),
                              generated_tokens_per_s=tokens / clock.generation))
    timed = steps[args.warmup:]
    med = {k: statistics.median(s[k] for s in timed) for k in ("total_s", "generation_s", "scoring_s", "training_s")}
    row = dict(algo=algo, decode=decode, rollouts=args.batch, prompt_tokens=args.prompt, new_tokens=args.new_tokens,
               steps=steps, **{f"median_{k}": v for k, v in med.items()},
               **{f"share_{k[:-2]}": med[k] / med["total_s"] for k in ("generation_s", "scoring_s", "training_s")},
               generated_tokens_per_s=args.batch * args.new_tokens / med["generation_s"])
    if device == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    print(f"  {algo:<4} {decode:<6} step {med['total_s']:7.2f} s = generation {med['generation_s']:6.2f} s "
          f"({100 * row['share_generation']:4.1f}%) + scoring {med['scoring_s']:6.2f} s ({100 * row['share_scoring']:4.1f}%) "
          f"+ training {med['training_s']:6.2f} s ({100 * row['share_training']:4.1f}%);  "
          f"{row['generated_tokens_per_s']:.0f} generated tok/s")
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5b", choices=sorted(SHAPES))
    ap.add_argument("--algos", default="ppo,grpo")
    ap.add_argument("--decodes", default="plain,static,graph")
    ap.add_argument("--batch", type=int, default=64, help="rollouts per step (GRPO: prompts x --group)")
    ap.add_argument("--group", type=int, default=8, help="GRPO's num_generations")
    ap.add_argument("--mini-batch", type=int, default=16)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, a few tokens: checks the script runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype = "cpu", torch.float32
        args.shape, args.decodes, args.batch, args.group, args.mini_batch = "smoke", "plain,static", 4, 2, 2
        args.ppo_epochs, args.prompt, args.new_tokens, args.warmup, args.steps = 1, 5, 4, 1, 1
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU machine (or with --smoke on the CPU)")
        sys.exit(2)
    else:
        device, dtype = "cuda", torch.bfloat16
    cfg = ModelConfig.from_hf_dict({**SHAPES[args.shape], **COMMON, "model_type": "qwen2"})
    info = machine_info(device)
    print("machine:", ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"{args.shape}: {args.batch} rollouts a step, prompts of {args.prompt} tokens, up to {args.new_tokens} new, "
          f"LoRA r={args.r}, {dtype}")
    result = dict(machine=info, args={k: str(v) for k, v in vars(args).items()}, rows=[])
    for algo in args.algos.split(","):
        for decode in args.decodes.split(","):
            result["rows"].append(measure(algo, decode, cfg, args, device, dtype))
            write_json(args.json, result)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return result


if __name__ == "__main__":
    main()
