"""Shared pieces of the training tests: a tiny regression task with its data, and a spawned process
joined to a gloo group as torchrun would set it up (so `training.encoder.main` reads RANK etc.)."""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset


class Points(Dataset):
    """y = x . w + 0.5 on 64 fixed points; item `poison` has a NaN input."""

    def __init__(self, poison: int | None = None) -> None:
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 4, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.5
        if poison is not None:
            self.x[poison, 0] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class Regression(nn.Module):
    """A task as the loop sees it: forward(batch) -> {"loss", other scalars}."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        pred = self.linear(x).squeeze(-1)
        return {"loss": (pred - y).square().mean(), "pred_mean": pred.mean()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def torchrun_rank(rank: int, port: int, world: int = 2) -> Iterator[None]:
    """This spawned process as `rank` of a `world`-process gloo group, with torchrun's environment;
    the group is destroyed on exit, after freeing what DDP wrapped."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        gc.collect()
        dist.destroy_process_group()
