"""Data parallelism: the same loop on N processes, each with a slice of every batch.

`torchrun --nproc_per_node N -m minitune train ...` starts N copies of the program and sets
RANK, LOCAL_RANK and WORLD_SIZE (plus MASTER_ADDR/PORT) in each one's environment. Every process
holds a full copy of the model wrapped in DistributedDataParallel (Li et al. 2020): backward
all-reduces (averages) the gradients across processes, so each copy takes the same optimizer step
and the copies never drift apart. With W processes, each taking B examples per forward pass and
A passes per step, one optimizer step sees a global batch of B * W * A examples.

Every process computes the same seeded order of the data and takes its share of each global
batch, like torch's DistributedSampler: rank r gets positions r, r + W, r + 2W, ... Communication
goes through gloo on CPU and NCCL on GPUs. Only rank 0 prints, logs and writes files.
"""

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when not launched by torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup(device: str) -> torch.device:
    """Join the process group if torchrun started us; returns this process's device."""
    rank, size = world()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process; set_device needs the index even for one
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def is_main() -> bool:
    return world()[0] == 0


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over all processes (one collective call); identity on one process."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device) -> list[float]:
    """The largest of each number over all processes; identity on one process."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of t [b, ...] (the same b on each), rank 0's first: [W * b, ...]; t on one process."""
    if world()[1] == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def shard(items: list, rank: int, size: int) -> list:
    """This process's share of a global batch (DistributedSampler's interleaving)."""
    return items[rank::size]


def barrier():
    """Wait until every process gets here; nothing to wait for on one process."""
    if world()[1] > 1:
        dist.barrier()


def broadcast_int(value: int) -> int:
    """Rank 0's `value` on every process (a sum where the other ranks put 0: no pickled objects on the wire)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value if is_main() else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item())
