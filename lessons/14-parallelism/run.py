"""Lesson 14: data parallelism and sharding (数据并行 / 分片): what each rank holds, measured on CPU processes.

    python lessons/14-parallelism/run.py            # 2 and 4 CPU processes (gloo) with the tiny model; ~2 min
    python lessons/14-parallelism/run.py --fast     # CI: 2 processes, a few steps (< 60 s)
    python lessons/14-parallelism/run.py --ranks 2 4 8 --steps 20

1. the bill: bytes per parameter per rank under DDP, ZeRO-1/2/3 and offload, for 0.5B, 7B and 72B models;
2. the same steps: DDP, ZeRO-2, ZeRO-3 and ZeRO-3 + offload on N processes against one process with the
   same global batch (minitune.train with `fsdp`, train/fsdp.py);
3. what each rank holds, measured: parameter + AdamW bytes per rank against per_rank_memory;
4. what moves: the collectives of one step and their bytes, DDP's all-reduce against ZeRO's
   reduce-scatter + all-gather, and the measured step times;
5. beyond sharding: the numbers that call for tensor and pipeline parallelism;
6. the other stages sharded: DPO against one process, and what each rank holds of PPO's models
   (rlhf/sharded.py), on 2 processes.
"""
import argparse
import copy
import json
import os
import socket
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
import torch.multiprocessing as mp

import minitune
from minitune import memory
from minitune.classroom.claims import claim, finish_claims, not_checked
from minitune.classroom.lesson import finish, section
from minitune.data import prepare_sft
from minitune.model import ModelConfig
from minitune.rlhf import PPOConfig, RewardModel, prepare_pairs, sharded, text_reward, train_dpo, train_ppo
from minitune.tiny.evaluate import prompt_ids, stop_ids
from minitune.tiny.tasks import preference_score
from minitune.train import TrainConfig, fsdp, train

STRATEGIES = {"ddp": None, "zero2": "shard_grad_op", "zero3": "full_shard", "offload": "full_shard offload"}
GLOBAL_BATCH = 8
# shapes of real models (config.json numbers): Qwen2.5-0.5B, LLaMA-2-7B, Qwen2.5-72B
MODELS = {
    "0.5B (Qwen2.5-0.5B)": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, model_type="qwen2",
                                       tie_word_embeddings=True),
    "7B (LLaMA-2-7B)": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, model_type="llama"),
    "72B (Qwen2.5-72B)": ModelConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                                     num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                     model_type="qwen2"),
}


def parse_args():
    p = argparse.ArgumentParser(description="Lesson 14: DDP, ZeRO-2/3 and offload on CPU processes")
    p.add_argument("--model", default="weights/tiny", help="checkpoint folder with data/ (default weights/tiny)")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="process counts to run (default 2 4; "
                   "--fast: 2). Each must divide the global batch of 8")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 12; --fast 3)")
    p.add_argument("--fast", action="store_true", help="CI mode: 2 processes, 3 steps")
    p.add_argument("--seed", type=int, default=0, help="training seed: the data order (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process (default 1)")
    p.add_argument("--device", default="cpu", choices=["cpu"], help="cpu only: the processes talk over gloo")
    p.add_argument("--dtype", default="float32", choices=["float32"],
                   help="float32 only: the losses are compared to 1e-5")
    return p.parse_args()


def the_bill():
    """Section 1: per_rank_memory for real shapes, mixed precision (bf16 weights, fp32 master + AdamW)."""
    section("1. the bill: what each of 8 ranks holds for full fine-tuning in bf16 (weights, grads, AdamW + master)")
    for name, cfg in MODELS.items():
        est = memory.estimate_memory(cfg, "full", torch.bfloat16, batch_size=1, seq_len=1024)
        print(f"\n{name}: {est.n_params / 1e9:.2f}B parameters, 16 bytes each = "
              f"{memory.human_bytes(16 * est.n_params)} "
              f"of model state; activations at 1 x 1024 tokens {memory.human_bytes(est.activations)}")
        print(memory.per_rank_table(est, 8))
    est = memory.estimate_memory(MODELS["7B (LLaMA-2-7B)"], "full", torch.bfloat16, batch_size=1, seq_len=1024)
    ddp, zero3 = memory.per_rank_memory(est, 8, "ddp"), memory.per_rank_memory(est, 8, "zero3")
    claim("7B full fine-tuning does not fit one 80 GB GPU under DDP, and does under ZeRO-3 on 8",
          ddp.total > 80e9 > zero3.total,
          f"DDP {memory.human_bytes(ddp.total)}, ZeRO-3 {memory.human_bytes(zero3.total)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(strategy: str, world: int, steps: int, seed: int) -> TrainConfig:
    return TrainConfig(learning_rate=1e-3, max_steps=steps, per_device_train_batch_size=GLOBAL_BATCH // world,
                       warmup_ratio=0.1, logging_steps=steps, save_steps=0, device="cpu", seed=seed,
                       fsdp=STRATEGIES[strategy])


def worker(rank: int, world: int, port: int, job: dict):
    """One process of N: every strategy in turn on the same model and data; rank r writes rank{r}.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(job["threads"])
    sys.stdout = sys.stderr = open(os.devnull, "w")  # rank 0's progress and notes: the lesson prints the numbers
    data = json.loads(Path(job["data"]).read_text())
    out = {}
    for strategy in STRATEGIES:
        model, _ = minitune.load_pretrained(job["model"], device="cpu", dtype=torch.float32)
        result = train(model, data, run_config(strategy, world, job["steps"], job["seed"]))
        out[strategy] = {"losses": result.losses, "state_bytes": result.state_bytes,
                         "s_per_step": result.runtime_s / job["steps"]}
    if job["stages"]:  # section 6
        out["dpo"] = {"losses": dpo_losses(job, world)}
        out["ppo"] = ppo_on_ranks(job)
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def run_processes(world: int, job: dict) -> list[dict]:
    """Start `world` processes (what torchrun does: RANK, WORLD_SIZE, MASTER_ADDR/PORT) and read their numbers."""
    mp.spawn(worker, args=(world, free_port(), job), nprocs=world, join=True)
    ranks = [json.loads(Path(job["out"], f"rank{r}.json").read_text()) for r in range(world)]
    for got in ranks:
        for run in got.values():
            if "losses" in run:
                run["losses"] = {int(k): v for k, v in run["losses"].items()}
    return ranks


def the_same_steps(args, ranks_list, steps):
    """Section 2: one process with the global batch, then each strategy on N processes."""
    section(f"2. the same steps: one process with batch {GLOBAL_BATCH}, then N processes with "
            f"{GLOBAL_BATCH}/N each, under each strategy ({steps} steps of AdamW)")
    base = Path(args.model)
    if not (base / "config.json").is_file() or not (base / "data").is_dir():
        sys.exit(f"this lesson needs the tiny world: {base} with config.json and data/ (build it with "
                 "python -m minitune.tiny.build --out weights/tiny)")
    model, tok = minitune.load_pretrained(base, device="cpu", dtype=torch.float32)
    data = prepare_sft(base / "data" / "sft_alpaca.jsonl", tok, "chatml", cutoff_len=96, seed=0).train
    data = data[:GLOBAL_BATCH * steps]
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):
        one = train(model, data, run_config("ddp", 1, steps, args.seed))
    runs = {}
    with tempfile.TemporaryDirectory(prefix="minitune-lesson-14-") as scratch:  # the data in, the numbers out
        Path(scratch, "data.json").write_text(json.dumps(data))
        for world in ranks_list:
            job = {"model": str(base), "data": str(Path(scratch, "data.json")), "out": scratch, "steps": steps,
                   "seed": args.seed, "threads": args.threads, "stages": world == 2}
            runs[world] = run_processes(world, job)
    last = sorted(one.losses)[-3:]  # the last three steps
    print(f"\n{'run':<22}" + "".join(f"{'step ' + str(s):>12}" for s in last) + f"{'max |diff|':>12}")
    print(f"{'1 process':<22}" + "".join(f"{one.losses[s]:>12.6f}" for s in last))
    worst = 0.0
    for world, ranks in runs.items():
        for strategy in STRATEGIES:
            losses = ranks[0][strategy]["losses"]
            diff = max(abs(losses[s] - one.losses[s]) for s in one.losses)
            worst = max(worst, diff)
            print(f"{f'{world} x {strategy}':<22}" + "".join(f"{losses[s]:>12.6f}" for s in last)
                  + f"{diff:>12.1e}")
    claim("every strategy on N processes takes the 1-process losses, within 1e-5", worst < 1e-5, f"max {worst:.1e}")
    return model, one, runs


def what_each_rank_holds(model, one, runs):
    """Section 3: measured bytes of parameters + AdamW state per rank, against the formula."""
    section("3. what each rank holds, measured: parameter + AdamW bytes per rank (between steps)")
    est = memory.estimate_memory(model.config, "full", torch.float32)
    formula_one = est.parameters + est.optimizer_states
    print(f"1 process: {one.state_bytes:,} bytes measured, {formula_one:,.0f} by the formula (4 + 8 bytes x "
          f"{est.n_params:,} parameters; gradients are freed after each step)")
    print(f"\n{'run':<14}{'rank':>5}{'measured':>12}{'formula':>12}{'share of 1 process':>20}")
    shares = {}
    for world, ranks in runs.items():
        for strategy in STRATEGIES:
            # between steps FSDP2 keeps only the shards, ZeRO-2 included (it frees the whole weights after
            # backward) and offload too (in CPU memory): ZeRO-3's per-rank figure is what a rank holds here
            m = memory.per_rank_memory(est, world, "ddp" if strategy == "ddp" else "zero3")
            formula = m.parameters + m.optimizer_states
            for r, got in enumerate(ranks):
                held = got[strategy]["state_bytes"]
                shares[(world, strategy, r)] = held / one.state_bytes
                print(f"{f'{world} x {strategy}':<14}{r:>5}{held:>12,}{formula:>12,.0f}{held / one.state_bytes:>20.3f}")
    sharded = {key: share * key[0] for key, share in shares.items() if key[1] != "ddp"}  # share x N: 1 when even
    worst = max(abs(v - 1) for v in sharded.values())
    claim("under ZeRO-2/3 each of N ranks holds 1/N of the parameter + AdamW bytes (within 5%)", worst < 0.05,
          f"share x N within {worst:.1%} of 1 over {len(sharded)} ranks")
    ddp = [share for key, share in shares.items() if key[1] == "ddp"]
    claim("under DDP every rank holds all of them", all(abs(share - 1) < 1e-9 for share in ddp),
          f"share {min(ddp):.3f}-{max(ddp):.3f} on {len(ddp)} ranks")


def what_moves(model, runs):
    """Section 4: bytes each rank sends per step (ring collectives), and the measured step time."""
    section("4. what moves: each rank's traffic per optimizer step, and the measured time per step")
    p = memory.count_parameters(model.config)
    print("ring algorithms: an all-reduce of B bytes over N ranks sends 2 (N-1)/N B per rank; a reduce-scatter or "
          "an all-gather sends (N-1)/N B")
    print(f"\n{'model':<22}{'N':>4}{'DDP all-reduce':>16}{'ZeRO-2 RS + AG':>16}{'ZeRO-3 RS + 2 AG':>18}")
    rows = [("tiny, fp32", p, 4)] + [(name.split(' ')[0] + ", bf16", memory.count_parameters(cfg), 2)
                                     for name, cfg in MODELS.items()]
    for name, n, width in rows:
        for world in (2, 8):
            b = n * width * (world - 1) / world
            print(f"{name:<22}{world:>4}{memory.human_bytes(2 * b):>16}{memory.human_bytes(2 * b):>16}"
                  f"{memory.human_bytes(3 * b):>18}")
    print(f"\nmeasured seconds per step (gloo on CPU, {os.cpu_count()} cores shared by all the processes):")
    print(f"{'N':>4}" + "".join(f"{s:>10}" for s in STRATEGIES))
    for world, ranks in runs.items():
        print(f"{world:>4}" + "".join(f"{ranks[0][s]['s_per_step']:>10.3f}" for s in STRATEGIES))


def beyond_sharding():
    """Section 5: where ZeRO stops being enough."""
    section("5. beyond sharding: when tensor and pipeline parallelism come in")
    cfg = MODELS["72B (Qwen2.5-72B)"]
    n = memory.count_parameters(cfg)
    layer = memory.parameter_counts(cfg)["linear"] / cfg.num_hidden_layers
    for world in (8, 16, 32):
        print(f"72B, ZeRO-3 over {world:>2} GPUs: {memory.human_bytes(16 * n / world)} of model state per GPU")
    print(f"one block all-gathered in bf16: {memory.human_bytes(2 * layer)}; per step each rank sends ~3 x "
          f"{memory.human_bytes(2 * n)}: {3 * 2 * n / 50e9:.0f} s at 50 GB/s (400 Gb/s InfiniBand), "
          f"{3 * 2 * n / 450e9:.1f} s at 450 GB/s (NVLink)")
    tokens, kv = 8192, cfg.num_key_value_heads * cfg.head_dim
    block = tokens * (6 * cfg.hidden_size + 2 * kv + 4 * cfg.intermediate_size) * 2  # memory.py's count, in bf16
    print(f"activations of one {tokens}-token sequence, one block, bf16: ~{memory.human_bytes(block)}"
          f"; x {cfg.num_hidden_layers} blocks: {memory.human_bytes(block * cfg.num_hidden_layers)}"
          " (not sharded by ZeRO: recompute them, or split them with tensor / sequence parallelism)")


# --------------------------------------------------------------------------- 6
def dpo_losses(job: dict, world: int) -> dict:
    """DPO (lesson 12) on the tiny world's preference pairs, sharded with full_shard on more than one process."""
    model, tok = minitune.load_pretrained(job["model"], device="cpu", dtype=torch.float32)
    pairs = prepare_pairs(Path(job["model"]) / "data" / "preference.jsonl", tok, "chatml", cutoff_len=96,
                          val_size=0, seed=0)
    pairs.train = pairs.train[:GLOBAL_BATCH * job["steps"]]
    cfg = TrainConfig(stage="dpo", learning_rate=1e-4, max_steps=job["steps"], pref_beta=0.1, save_steps=0,
                      per_device_train_batch_size=GLOBAL_BATCH // world, logging_steps=job["steps"], device="cpu",
                      seed=job["seed"], fsdp="full_shard" if world > 1 else None)
    return train_dpo(model, pairs, cfg, tok).losses


def ppo_on_ranks(job: dict) -> dict:
    """PPO's models (lesson 11) sharded on this rank: the bytes it holds of each, then a few sharded PPO steps
    (every rank rolls out its half of each batch; the records are the whole batch's)."""
    sft, tok = minitune.load_pretrained(job["model"], device="cpu", dtype=torch.float32)
    models = {"actor": sft, "critic": RewardModel(copy.deepcopy(sft), init_std=0.0), "reference": copy.deepcopy(sft)}
    whole = {name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in models.items()}
    dp = sharded.start("full_shard", torch.device("cpu"))
    shards = dp.shard(dict(models))
    held = {name: sum(fsdp.local(p).numel() * p.element_size() for p in shards[name].parameters()) for name in models}
    dp.unshard(shards)  # whole again: train_ppo shards them itself
    questions = [json.loads(line)["prompt"] for line in (Path(job["model"]) / "data" / "preference.jsonl").open()]
    stops = stop_ids(tok)
    cfg = PPOConfig(steps=job["steps"] // 2, batch_size=GLOBAL_BATCH, mini_batch_size=GLOBAL_BATCH, ppo_epochs=2,
                    learning_rate=1e-5, max_new_tokens=12, seed=job["seed"], warn=False, fsdp="full_shard")
    reward = text_reward(preference_score, tok, stops)  # the tiny world's rule (lesson 11): not a model to shard
    records = train_ppo(models["actor"], models["critic"], models["reference"], reward,
                        [prompt_ids(tok, q) for q in questions[:64]], cfg, stops, stops[0])
    return {"whole": whole, "held": held, "records": [{k: r[k] for k in ("reward", "kl", "response_length")}
                                                      for r in records]}


def the_other_stages(args, runs, steps):
    """Section 6: DPO sharded against one process; what each rank holds of PPO's models, and its records."""
    section("6. the other stages sharded: DPO against one process, PPO's models on 2 processes (rlhf/sharded.py)")
    if 2 not in runs:
        print("(runs only when --ranks includes 2)")
        not_checked(["DPO sharded on 2 processes takes the 1-process losses, within 1e-5",
                     "each of 2 ranks holds half of each PPO model it shards (within 5%)",
                     "both ranks log the same PPO records (gathered over the whole batch)"])
        return
    ranks = runs[2]
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):
        one = dpo_losses({"model": args.model, "steps": steps, "seed": args.seed}, 1)
    diff = max(abs(ranks[r]["dpo"]["losses"][s] - one[s]) for r in range(2) for s in one)
    print(f"DPO, {steps} steps of {GLOBAL_BATCH} pairs: loss at step {steps} {one[steps]:.6f} on one process, "
          f"{ranks[0]['dpo']['losses'][steps]:.6f} on 2 x full_shard (max |diff| {diff:.1e})")
    claim("DPO sharded on 2 processes takes the 1-process losses, within 1e-5", diff < 1e-5, f"max {diff:.1e}")
    print("\nPPO's models sharded with full_shard, bytes of parameters (the reward is the tiny world's rule):")
    print(f"{'model':<12}{'whole':>12}{'rank 0':>12}{'rank 1':>12}")
    worst = 0.0
    for name, size in ranks[0]["ppo"]["whole"].items():
        held = [ranks[r]["ppo"]["held"][name] for r in range(2)]
        worst = max(worst, *(abs(h * 2 / size - 1) for h in held))
        print(f"{name:<12}{size:>12,}{held[0]:>12,}{held[1]:>12,}")
    claim("each of 2 ranks holds half of each PPO model it shards (within 5%)", worst < 0.05,
          f"share x 2 within {worst:.1%} of 1")
    recs = [ranks[r]["ppo"]["records"] for r in range(2)]
    for i, rec in enumerate(recs[0], 1):
        print(f"PPO step {i}: reward {rec['reward']:.3f}, KL {rec['kl']:.4f}, response length "
              f"{rec['response_length']:.2f} (the whole batch: each rank rolled out {GLOBAL_BATCH // 2} prompts)")
    claim("both ranks log the same PPO records (gathered over the whole batch)", recs[0] == recs[1],
          f"{len(recs[0])} steps")


def main():
    args = parse_args()
    ranks_list = args.ranks or ([2] if args.fast else [2, 4])
    steps = args.steps or (3 if args.fast else 12)
    bad = [w for w in ranks_list if w < 2 or GLOBAL_BATCH % w]
    if bad:
        sys.exit(f"--ranks {bad}: each must be at least 2 and divide the global batch of {GLOBAL_BATCH}")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    the_bill()
    model, one, runs = the_same_steps(args, ranks_list, steps)
    what_each_rank_holds(model, one, runs)
    what_moves(model, runs)
    beyond_sharding()
    the_other_stages(args, runs, steps)
    finish("14")
    finish_claims(args.fast, args.model)


if __name__ == "__main__":
    main()
