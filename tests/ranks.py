"""Running one test body on W CPU processes (gloo), started as torchrun starts them, for the sharding tests
(test_fsdp.py, test_fsdp_stages.py, test_fsdp_rl.py): each process runs body(rank, out) and writes what it
returns to out/rank{r}.json; the parent reads the W results back. One spawn per test file: starting the
processes and importing torch is the slow part."""

import json
import os
import shutil
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from minitune.train import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank: int, body, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    got = body(rank, out)
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))
    torch.distributed.destroy_process_group()


def on_ranks(body, out, world: int = 2) -> list[dict]:
    """body(rank, out) -> a JSON-able dict, run on `world` processes (body: a module-level function)."""
    mp.spawn(_process, args=(body, world, free_port(), str(out)), nprocs=world, join=True)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def keys_to_int(results: dict) -> dict:
    """JSON made the step numbers of {step: value} strings: back to ints."""
    return {int(k): v for k, v in results.items()}


def copy_checkpoint(rank: int, out: str, step: int = 2, source: str = "a", target: str = "b") -> str:
    """out/source/checkpoint-{step} alone in out/target (rank 0 copies, every rank waits): a run to resume."""
    if rank == 0:
        shutil.copytree(os.path.join(out, source, f"checkpoint-{step}"), os.path.join(out, target, f"checkpoint-{step}"))
    distributed.barrier()
    return os.path.join(out, target)
