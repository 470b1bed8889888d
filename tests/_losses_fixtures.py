"""Helpers for the losses tests: run a function on W gloo processes and collect what each returns,
plus direct (non-distributed, plain autograd) reference formulas to compare against."""

from __future__ import annotations

import datetime
import gc
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _entry(rank: int, fn: Callable, world: int, store: str, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store, world),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        gc.collect()  # nothing collective may outlive the group (offline_env.md section 2)
        dist.destroy_process_group()
    # Success: skip interpreter teardown, which takes seconds per process on a busy 2-core machine.
    # On an exception we never get here and torch.multiprocessing reports the child's traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(fn: Callable, world: int, tmp_path: Path, *args: object) -> list[dict]:
    """Run `fn(rank, world, *args)` on `world` spawned gloo processes; return each rank's result."""
    out_dir = tmp_path / f"results_{fn.__name__}_{world}"
    out_dir.mkdir()
    store = str(tmp_path / f"store_{fn.__name__}_{world}")
    mp.spawn(_entry, args=(fn, world, store, str(out_dir), args), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


# --- direct references (plain autograd, one process, whole batch and all classes) -----------------


def direct_margin(cos: torch.Tensor, labels: torch.Tensor, kind: str, scale: float, **kw: float) -> torch.Tensor:
    """Margin logits written straight from the definitions with torch.acos / torch.cos."""
    cols = cos.shape[1]
    onehot = F.one_hot(labels.clamp_min(0), cols).bool() & (labels >= 0).unsqueeze(1)
    if kind == "cosface":
        phi = cos - kw["margin"]
    else:
        m1, m2, m3 = (1.0, kw["margin"], 0.0) if kind == "arcface" else (kw["m1"], kw["m2"], kw["m3"])
        theta = torch.acos(cos)
        theta_max = min(math.pi, (math.pi - m2) / m1)
        fallback = cos - math.sin(theta_max) * (math.pi - theta_max)
        phi = torch.where(theta > theta_max, fallback, torch.cos(m1 * theta + m2)) - m3
        if kw.get("easy_margin"):
            phi = torch.where(cos > 0, torch.cos(theta + m2), cos)
    return scale * torch.where(onehot, phi, cos)


def direct_cross_entropy(x: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, kind: str, **kw) -> torch.Tensor:
    cos = F.normalize(x, dim=1) @ F.normalize(centres, dim=1).T
    return F.cross_entropy(direct_margin(cos, labels, kind, 64.0, **kw), labels)


def direct_two_anchor(
    x: torch.Tensor, centres: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, m1: float, m2: float, s: float
) -> torch.Tensor:
    """log(1 + sum_{j!=y} e^{s cos_j} / e^{s(cos_y - m1)} + sum_{j!=y} e^{s cos^e_j} / e^{s(cos^e_y - m2)})."""
    xn = F.normalize(x, dim=1)
    cos_w = xn @ F.normalize(centres, dim=1).T
    cos_e = xn @ F.normalize(bank, dim=1).T
    onehot = F.one_hot(labels, centres.shape[0]).bool()
    tw = s * (cos_w[onehot] - m1)
    te = s * (cos_e[onehot] - m2)
    neg_w = torch.where(onehot, torch.zeros_like(cos_w), torch.exp(s * cos_w - tw.unsqueeze(1))).sum(1)
    neg_e = torch.where(onehot, torch.zeros_like(cos_e), torch.exp(s * cos_e - te.unsqueeze(1))).sum(1)
    return torch.log(1 + neg_w + neg_e).mean()
