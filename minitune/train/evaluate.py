"""Evaluation, and the two small helpers it shares with the training loop (trainer.py).

The held-out loss is weighted like the training loss: the mean over all N trainable items of
`data`, not the mean of per-batch means,

    eval_loss = sum_i loss_i * n_i / sum_i n_i        (loss_i: mean over batch i's n_i items)

so it does not depend on the batch size or on how the examples fall into batches; each process
takes its share of `data` and the two sums are all-reduced.
"""

import torch

from . import distributed as dist


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def split_output(out) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """loss_fn returns (loss, n) or (loss, n, metrics): metrics = {name: mean over the batch's n items},
    e.g. DPO's reward accuracy; the trainer weights them by n like the loss and logs them."""
    return out[0], out[1], (out[2] if len(out) > 2 else {})


@torch.no_grad()
def evaluate_metrics(model, data: list, collate, loss_fn, batch_size: int, device, autocast) -> tuple[float, dict]:
    """Token-weighted mean loss (and loss_fn's extra metrics) over `data`; each process takes its
    share and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    rank, size = dist.world()
    mine = dist.shard(list(range(len(data))), rank, size)
    loss_sum, count, sums = 0.0, 0.0, {}
    for i in range(0, len(mine), batch_size):
        with autocast():
            batch = to_device(collate([data[j] for j in mine[i:i + batch_size]]), device)
            loss, n, metrics = split_output(loss_fn(model, batch))
        loss_sum, count = loss_sum + float(loss) * float(n), count + float(n)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * float(n)
    names = sorted(sums)  # the same order on every process
    loss_sum, count, *values = dist.all_reduce_sum([loss_sum, count] + [sums[k] for k in names], device)
    model.train(was_training)
    return loss_sum / max(count, 1.0), {k: v / max(count, 1.0) for k, v in zip(names, values)}


def evaluate(model, data: list, collate, loss_fn, batch_size: int, device, autocast) -> float:
    """Token-weighted mean loss over `data` (each process takes its share; sums are all-reduced)."""
    return evaluate_metrics(model, data, collate, loss_fn, batch_size, device, autocast)[0]
