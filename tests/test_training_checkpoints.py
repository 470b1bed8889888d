"""Training checkpoints under failure: stale temp files, a full disk, a truncated or corrupt newest
checkpoint, and log lines of a resumed run."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import training.checkpoint as ckpt
from training.checkpoint import CheckpointCorruptError, CheckpointManager, CheckpointWriteError, read_checkpoint
from training.config import CheckpointConfig, LoopConfig, OptimConfig
from training.loop import Trainer, build_adamw

pytestmark = pytest.mark.usefixtures("single_thread")


class Points(Dataset):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 4, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.5

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": (self.linear(x).squeeze(-1) - y).square().mean()}


def make_trainer(run: Path, max_steps: int = 6, **ckpt_args: object) -> Trainer:
    task = Regression()
    optim = OptimConfig(lr=0.1, weight_decay=0.0, warmup_steps=1, clip_grad_norm=None)
    loop = LoopConfig(max_steps=max_steps, log_every=1, tensorboard=False, progress_bar=False)
    checkpoint = CheckpointConfig(**{"every_steps": 1, "keep_last": 10, **ckpt_args})
    return Trainer(task, build_adamw(task, optim), Points(), 8, optim=optim, loop=loop, checkpoint=checkpoint,
                   run_dir=run, device=torch.device("cpu"))


def weights(path: Path) -> torch.Tensor:
    return read_checkpoint(path)["model"]["replicated"]["linear.weight"]


def test_stale_temp_files_are_removed_at_start_and_at_the_next_save(tmp_path: Path) -> None:
    make_trainer(tmp_path, max_steps=2).fit()
    directory = tmp_path / "checkpoints"
    # What a save killed mid-write leaves: a temporary checkpoint, a temporary pointer, a lone sidecar.
    leftovers = [directory / ".step_00000007.pt.abc123.tmp", directory / ".latest.x1.tmp",
                 directory / "step_00000007.pt.sha256"]
    for path in leftovers:
        path.write_bytes(b"partial")
    keep = directory / "notes.txt"
    keep.write_text("mine")
    make_trainer(tmp_path, max_steps=3).fit()  # start of the run: cleaned before resuming
    assert not any(p.exists() for p in leftovers) and keep.exists()
    manager = CheckpointManager(directory)
    (directory / ".step_00000009.pt.zz.tmp").write_bytes(b"x")
    manager.save({"format": ckpt.FORMAT}, 9)  # and at every save
    assert not (directory / ".step_00000009.pt.zz.tmp").exists()
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == []


class _FullDisk:
    """`os.fdopen` replacement whose files accept `capacity` bytes, then fail with ENOSPC."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.real = os.fdopen

    def __call__(self, fd: int, mode: str = "r", *args: object, **kwargs: object):  # noqa: ANN204
        f = self.real(fd, mode, *args, **kwargs)
        disk = self

        class Limited:
            def __enter__(self):  # noqa: ANN204
                return self

            def __exit__(self, *exc: object) -> None:
                f.close()

            def write(self, data: bytes) -> int:
                if len(data) > disk.capacity:
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.capacity -= len(data)
                return f.write(data)

            def flush(self) -> None:
                f.flush()

            def fileno(self) -> int:
                return f.fileno()

        return Limited()


def test_disk_full_names_the_file_and_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    make_trainer(tmp_path, max_steps=2).fit()
    directory = tmp_path / "checkpoints"
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    monkeypatch.setattr(ckpt.os, "fdopen", _FullDisk(capacity=600))
    trainer = make_trainer(tmp_path, max_steps=4)
    with pytest.raises(CheckpointWriteError) as info:
        trainer.fit()
    message = str(info.value)
    assert f"disk full while writing {directory / 'step_00000003.pt'}" in message
    assert "last good checkpoint: step_00000002.pt" in message
    assert "inline_container" not in message
    monkeypatch.undo()
    # Nothing saved was lost or changed, and no temporary file is left.
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert CheckpointManager(directory).latest() == directory / "step_00000002.pt"
    assert read_checkpoint(directory / "step_00000002.pt")["progress"]["step"] == 2


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, capsys) -> None:
    make_trainer(tmp_path, max_steps=4).fit()
    straight = weights(tmp_path / "checkpoints" / "step_00000004.pt")
    newest = tmp_path / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy cut short
    checksum = ckpt.checksum_path(newest)
    checksum.unlink()  # even without its checksum the truncation is caught by torch.load
    with pytest.raises(ValueError, match="step_00000004.pt: not a readable training checkpoint"):
        read_checkpoint(newest)
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.fit()
    out = capsys.readouterr().out
    assert "warning: skipping checkpoint" in out and "step_00000004.pt" in out
    assert "resuming from step_00000003.pt" in out
    # It continued from step 3 and re-did step 4 exactly.
    assert trainer.progress.step == 4
    assert torch.equal(weights(newest), straight)


def test_flipped_byte_is_refused_by_the_checksum(tmp_path: Path, capsys) -> None:
    make_trainer(tmp_path, max_steps=3).fit()
    newest = tmp_path / "checkpoints" / "step_00000003.pt"
    good = newest.read_bytes()
    straight = weights(newest)
    # Flip one bit inside the weight's tensor data (the 4 floats of linear.weight).
    raw = bytearray(good)
    at = good.find(straight.numpy().tobytes())
    assert at > 0
    raw[at + 1] ^= 0x10
    newest.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError, match=r"step_00000003.pt: sha256 .* does not match .* refusing"):
        read_checkpoint(newest)
    # Without the checksum torch.load would have accepted it and silently changed a weight.
    sidecar = ckpt.checksum_path(newest)
    recorded = sidecar.read_text()
    sidecar.unlink()
    assert not torch.equal(weights(newest), straight)
    sidecar.write_text(recorded)
    # An explicit resume from that file is refused with the reason; auto-resume falls back.
    with pytest.raises(CheckpointCorruptError, match="step_00000003.pt"):
        make_trainer(tmp_path, max_steps=3, resume=str(newest)).fit()
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit()
    assert "resuming from step_00000002.pt" in capsys.readouterr().out
    assert torch.equal(weights(newest), straight)  # step 3 re-done and written again, checksum and all
    # A sidecar in the wrong size is also refused (truncated with its checksum intact).
    newest.write_bytes(newest.read_bytes()[:-10])
    with pytest.raises(CheckpointCorruptError, match="bytes, .* were written"):
        read_checkpoint(newest)
    # Nothing loadable at all: say so, listing every file, instead of silently starting over.
    for path in (tmp_path / "checkpoints").glob("step_*.pt"):
        path.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"no checkpoint can be loaded: step_00000003.pt: .*step_00000001.pt"):
        make_trainer(tmp_path, max_steps=3).fit()


def test_resumed_run_does_not_repeat_log_lines(tmp_path: Path) -> None:
    make_trainer(tmp_path, max_steps=6, every_steps=3).fit()
    # A crash after step 5 was logged but before its checkpoint: only step 3 is on disk.
    (tmp_path / "checkpoints" / "step_00000006.pt").unlink()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000003.pt\n")
    make_trainer(tmp_path, max_steps=6, every_steps=3).fit()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if line["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    superseded = [json.loads(line)["step"] for line in (tmp_path / "log.superseded.jsonl").read_text().splitlines()]
    assert superseded == [4, 5, 6]  # the first run's later lines are kept aside, not lost
