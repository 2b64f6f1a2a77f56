"""The training run of the DistributedDataParallel test, importable by the processes it spawns."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fusedrnn
import fusedrnn.torch as frt

STEPS, BATCH, FEATURES, HIDDEN, TRAIN_STEPS = 6, 8, 3, 5, 3


class Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = frt.LSTM(FEATURES, HIDDEN, num_layers=2, batch_first=True, bidirectional=True,
                            dtype=torch.float64)
        self.head = torch.nn.Linear(2 * HIDDEN, 1, dtype=torch.float64)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y.mean(1))


def model_and_data():
    """The same initial model and full batch in every process."""
    torch.manual_seed(0)
    model = Regressor()
    x = torch.randn(BATCH, STEPS, FEATURES, dtype=torch.float64)
    target = torch.randn(BATCH, 1, dtype=torch.float64)
    return model, x, target


def train(model, x, target) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(TRAIN_STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        opt.step()


def run_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Trains on this rank's contiguous share of the batch and saves the final parameters."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # two processes share the cores
    fusedrnn.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model, x, target = model_and_data()
        share = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
        train(DistributedDataParallel(model), x[share], target[share])
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
