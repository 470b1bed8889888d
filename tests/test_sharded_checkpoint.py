"""Sharded (torch.distributed.checkpoint) training checkpoints: every rank writes its own Partial FC /
PCO rows and their AdamW moments, and another number of ranks reads them back resharded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _losses_fixtures import run_workers
from torch import nn

from lvface_mm.distributed import get_rank, get_world_size, shard_range
from lvface_mm.losses import PCOHead
from training.checkpoint import read_checkpoint
from training.sharded_checkpoint import FORMAT, load_sharded, read_meta, save_sharded

C, D = 23, 8  # 23 classes: 12 + 11 rows on 2 ranks, 8 + 8 + 7 on 3


class Task(nn.Module):
    """An encoder and a row-sharded PCO head, as the loop sees a face-recognition task."""

    def __init__(self, num_classes: int = C) -> None:
        super().__init__()
        self.encoder = nn.Linear(D, D)
        self.head = PCOHead(D, num_classes, sample_rate=1.0, stage=1)

    def sharded_modules(self) -> dict[str, nn.Module]:
        return {"head": self.head}


def global_rows(seed: int) -> torch.Tensor:
    return torch.arange(C * D, dtype=torch.float32).reshape(C, D) * 0.001 + seed


def _save(rank: int, world: int, directory: str) -> dict:
    torch.manual_seed(0)
    task = Task()
    optimizer = torch.optim.AdamW(task.parameters(), lr=0.1)
    for p in task.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # creates the AdamW state
    start, end = shard_range(C, rank, world)
    head = task.head
    with torch.no_grad():
        head.weight.copy_(global_rows(1)[start:end])
        head.stage = 2  # initialises the bank ...
        head.bank.expectation.copy_(global_rows(2)[start:end])  # ... which then holds known rows
        optimizer.state[head.weight]["exp_avg"].copy_(global_rows(3)[start:end])
        optimizer.state[head.weight]["exp_avg_sq"].copy_(global_rows(4)[start:end])
        task.encoder.weight.fill_(0.5)
    save_sharded(task, optimizer, Path(directory), {"format": FORMAT, "progress": {"step": 1}})
    return {"files": sorted(p.name for p in Path(directory).iterdir())}


def _load(rank: int, world: int, directory: str, num_classes: int = C) -> dict:
    task = Task(num_classes)
    optimizer = torch.optim.AdamW(task.parameters(), lr=0.1)  # no state yet: a fresh run resuming
    before = task.head.weight.detach().clone()
    try:
        load_sharded(task, optimizer, Path(directory), read_meta(Path(directory)))
    except ValueError as exc:
        return {"error": str(exc), "unchanged": torch.equal(task.head.weight.detach(), before)}
    head = task.head
    state = optimizer.state[head.weight]
    return {"rank": get_rank(), "world": get_world_size(), "start": head.class_start, "weight": head.weight.detach(),
            "bank": head.bank.expectation.clone(), "stage": head.stage, "initialized": bool(head.bank.initialized),
            "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"], "step": float(state["step"]),
            "encoder": task.encoder.weight.detach(), "encoder_moment": optimizer.state[task.encoder.weight]["exp_avg"]}


def _check(result: dict) -> None:
    start, n = result["start"], result["weight"].shape[0]
    assert torch.equal(result["weight"], global_rows(1)[start : start + n])
    assert torch.equal(result["bank"], global_rows(2)[start : start + n])
    assert torch.equal(result["exp_avg"], global_rows(3)[start : start + n])
    assert torch.equal(result["exp_avg_sq"], global_rows(4)[start : start + n])
    assert result["stage"] == 2 and result["initialized"] and result["step"] == 1.0
    assert torch.equal(result["encoder"], torch.full((D, D), 0.5))
    assert result["encoder_moment"].abs().sum() > 0  # the replicated AdamW state came back too


@pytest.mark.multiproc
def test_each_rank_writes_its_rows_and_another_world_size_reads_them(tmp_path: Path) -> None:
    directory = tmp_path / "step_00000001"
    saved = run_workers(_save, 2, tmp_path, str(directory))
    # One DCP file per rank, the metadata, meta.pt and the manifest; nothing gathered on one rank.
    assert saved[0]["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "meta.pt"]
    chunks = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata["sharded/head/weight"].chunks
    assert sorted((c.offsets[0], c.sizes[0]) for c in chunks) == [(0, 12), (12, 11)]  # rank 0's rows, rank 1's
    # 2 -> 3 ranks: each reads its own new rows (8 / 8 / 7) of centres, bank and moments.
    loaded = run_workers(_load, 3, tmp_path, str(directory))
    assert [r["start"] for r in loaded] == [0, 8, 16]
    for result in loaded:
        _check(result)
    # 2 -> 1 process (no process group): everything.
    single = _load(0, 1, str(directory))
    assert single["weight"].shape == (C, D)
    _check(single)
    # The whole checkpoint in one process, in the single-file layout.
    whole = read_checkpoint(directory)
    assert torch.equal(whole["model"]["sharded"]["head"]["weight"], global_rows(1))
    assert torch.equal(whole["optimizer"]["state"]["head.weight"]["exp_avg_sq"], global_rows(4))
    assert int(whole["model"]["sharded"]["head"]["stage"]) == 2
    # A genuinely incompatible checkpoint (another number of classes) names the directory; nothing loads.
    result = _load(0, 1, str(directory), num_classes=24)
    assert f"{directory}: sharded module 'head' was saved with 23 classes, this run has 24" in result["error"]
    assert result["unchanged"]
