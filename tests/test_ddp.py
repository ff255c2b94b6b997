"""DDP: 2 CPU processes (gloo) with per-device batch 2 take the same steps as 1 process with batch 4.

This test starts real processes (torch.multiprocessing, spawn) that talk over a localhost port;
it takes ~10-25 s, mostly starting Python and importing torch in each process.
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from ranks import free_port

from minitune.train import TrainConfig, train

STEPS = 4


def setup_run():
    from test_trainer import tiny_model, toy_data  # tests/ is on sys.path under pytest and in the children

    return tiny_model(), toy_data(20)


def config(batch: int, accum: int = 1) -> TrainConfig:
    return TrainConfig(learning_rate=3e-3, max_steps=STEPS, per_device_train_batch_size=batch,
                       gradient_accumulation_steps=accum, warmup_ratio=0.25, weight_decay=0.1,
                       logging_steps=1, save_steps=0, device="cpu", seed=3)


SPLITS = [(2, 1), (1, 2)]  # (per-device batch, accumulation) on 2 processes: global batch 4 both times


def worker(rank: int, world_size: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    for batch, accum in SPLITS:  # one start-up for both runs: starting processes is the slow part
        model, data = setup_run()
        result = train(model, data, config(batch, accum))
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        with open(os.path.join(out_dir, f"b{batch}a{accum}-rank{rank}.json"), "w") as f:
            json.dump({"losses": result.losses, "params": params.tolist()}, f)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    torch.set_num_threads(1)
    model, data = setup_run()
    single = train(model, data, config(4))
    single_params = torch.cat([p.detach().flatten() for p in model.parameters()])

    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for (batch, accum), rank in [(split, rank) for split in SPLITS for rank in range(2)]:
        got = json.loads((tmp_path / f"b{batch}a{accum}-rank{rank}.json").read_text())
        losses = {int(k): v for k, v in got["losses"].items()}
        assert sorted(losses) == list(range(1, STEPS + 1))
        for step, loss in single.losses.items():
            assert losses[step] == pytest.approx(loss, abs=1e-5)
        # every process holds the same weights as the single process (AdamW magnifies float noise)
        assert torch.allclose(torch.tensor(got["params"]), single_params, atol=1e-4)


def test_setup_cuda_names_the_gpu_index_for_a_single_process(monkeypatch):
    # torch.cuda.set_device rejects a bare torch.device("cuda"): a one-process CUDA run once failed there
    from minitune.train import distributed
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    device = distributed.setup("cuda")
    assert device == torch.device("cuda:0") and chosen == [torch.device("cuda:0")]
