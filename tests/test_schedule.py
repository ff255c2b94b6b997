"""Warmup + cosine/linear/constant schedules: known values, and the same learning rates as
transformers' get_scheduler for the same settings."""

import math

import pytest
import torch
from transformers import get_scheduler

from minitune.train.schedule import lr_lambda, make_scheduler, warmup_steps


def test_known_values():
    W, T = 10, 110  # warmup_ratio 0.1 of 100 decay steps + 10
    assert [lr_lambda(s, T, W, "cosine") for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert lr_lambda(60, T, W, "cosine") == pytest.approx(0.5)  # half-way through the decay
    assert lr_lambda(35, T, W, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_lambda(110, T, W, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(60, T, W, "linear") == pytest.approx(0.5)
    assert lr_lambda(85, T, W, "linear") == pytest.approx(0.25)
    assert lr_lambda(110, T, W, "linear") == 0.0
    assert lr_lambda(5, T, W, "constant") == 0.5 and lr_lambda(100, T, W, "constant") == 1.0
    assert warmup_steps(100, 0.1) == 10 and warmup_steps(7, 0.1) == 1 and warmup_steps(50, 0.0) == 0
    with pytest.raises(ValueError, match="unknown lr_scheduler_type"):
        lr_lambda(20, T, W, "cosin")


@pytest.mark.parametrize("kind, hf_name", [("cosine", "cosine"), ("linear", "linear"),
                                           ("constant", "constant_with_warmup")])
@pytest.mark.parametrize("total, ratio", [(37, 0.1), (20, 0.0)])
def test_same_learning_rates_as_transformers(kind, hf_name, total, ratio):
    def lrs(make):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
        sched = make(opt)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: make_scheduler(o, total, ratio, kind))
    theirs = lrs(lambda o: get_scheduler(hf_name, o, num_warmup_steps=math.ceil(ratio * total),
                                         num_training_steps=total))
    assert ours == pytest.approx(theirs, abs=1e-12)
