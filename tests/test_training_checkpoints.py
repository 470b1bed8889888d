"""Training checkpoints under failure, in both layouts (sharded DCP directories and single files): stale
temp files, a full disk, a truncated or corrupt newest checkpoint, and log lines of a resumed run."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import training.checkpoint as ckpt
from tests._training_fixtures import Points, Regression
from training.checkpoint import CheckpointCorruptError, CheckpointManager, CheckpointWriteError, read_checkpoint
from training.config import CheckpointConfig, LoopConfig, OptimConfig
from training.loop import Trainer, build_adamw

pytestmark = pytest.mark.usefixtures("single_thread")


LAYOUTS = ["sharded", "single_file"]


def make_trainer(run: Path, max_steps: int = 6, **ckpt_args: object) -> Trainer:
    task = Regression()
    optim = OptimConfig(lr=0.1, weight_decay=0.0, warmup_steps=1, clip_grad_norm=None)
    loop = LoopConfig(max_steps=max_steps, log_every=1, tensorboard=False, progress_bar=False)
    checkpoint = CheckpointConfig(**{"every_steps": 1, "keep_last": 10, **ckpt_args})
    return Trainer(task, build_adamw(task, optim), Points(), 8, optim=optim, loop=loop, checkpoint=checkpoint,
                   run_dir=run, device=torch.device("cpu"))


def weights(path: Path) -> torch.Tensor:
    return read_checkpoint(path)["model"]["replicated"]["linear.weight"]


def ckpt_path(run: Path, step: int, layout: str) -> Path:
    return run / "checkpoints" / (f"step_{step:08d}" + (".pt" if layout == "single_file" else ""))


def data_file(path: Path) -> Path:
    """The file holding the tensors: the checkpoint itself, or the sharded one's (only) DCP file."""
    return path if path.is_file() else next(path.glob("*.distcp"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stale_temp_files_are_removed_at_start_and_at_the_next_save(tmp_path: Path, layout: str) -> None:
    make_trainer(tmp_path, max_steps=2, format=layout).fit()
    directory = tmp_path / "checkpoints"
    # What a save killed mid-write leaves: a temporary checkpoint (file or directory), a temporary
    # pointer, a lone sidecar.
    leftovers = [directory / ".step_00000007.pt.abc123.tmp", directory / ".latest.x1.tmp",
                 directory / "step_00000007.pt.sha256"]
    for path in leftovers:
        path.write_bytes(b"partial")
    (directory / ".step_00000007.tmp").mkdir()
    (directory / ".step_00000007.tmp" / "__0_0.distcp").write_bytes(b"partial")
    leftovers.append(directory / ".step_00000007.tmp")
    keep = directory / "notes.txt"
    keep.write_text("mine")
    make_trainer(tmp_path, max_steps=3, format=layout).fit()  # start of the run: cleaned before resuming
    assert not any(p.exists() for p in leftovers) and keep.exists()
    assert CheckpointManager(directory).steps() == [1, 2, 3]
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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_disk_full_names_the_file_and_the_last_good_checkpoint(tmp_path: Path, monkeypatch, layout: str) -> None:
    make_trainer(tmp_path, max_steps=2, format=layout).fit()
    directory = tmp_path / "checkpoints"

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}

    before = snapshot()
    if layout == "single_file":
        monkeypatch.setattr(ckpt.os, "fdopen", _FullDisk(capacity=600))
    else:
        from torch.distributed.checkpoint.filesystem import FileSystem

        real = FileSystem.create_stream

        def no_space(self: FileSystem, path: object, mode: str):  # noqa: ANN202
            if "w" in mode:  # DCP's writer opening a file on a full disk
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(self, path, mode)

        monkeypatch.setattr(FileSystem, "create_stream", no_space)
    trainer = make_trainer(tmp_path, max_steps=4, format=layout)
    with pytest.raises(CheckpointWriteError) as info:
        trainer.fit()
    message = str(info.value)
    assert f"disk full while writing {ckpt_path(tmp_path, 3, layout)}" in message
    assert f"last good checkpoint: {ckpt_path(tmp_path, 2, layout).name}" in message
    assert "inline_container" not in message
    monkeypatch.undo()
    # Nothing saved was lost or changed, and no temporary file is left.
    assert snapshot() == before
    assert CheckpointManager(directory).latest() == ckpt_path(tmp_path, 2, layout)
    assert read_checkpoint(ckpt_path(tmp_path, 2, layout))["progress"]["step"] == 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, capsys, layout: str) -> None:
    make_trainer(tmp_path, max_steps=4, format=layout).fit()
    newest = ckpt_path(tmp_path, 4, layout)
    straight = weights(newest)
    data = data_file(newest)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # a copy cut short
    if layout == "single_file":
        ckpt.checksum_path(newest).unlink()  # even without its checksum the truncation is caught by torch.load
        with pytest.raises(ValueError, match="step_00000004.pt: not a readable training checkpoint"):
            read_checkpoint(newest)
    else:
        with pytest.raises(CheckpointCorruptError, match=r"__0_0.distcp: \d+ bytes, \d+ were written"):
            read_checkpoint(newest)
    trainer = make_trainer(tmp_path, max_steps=4, format=layout)
    trainer.fit()
    out = capsys.readouterr().out
    assert "warning: skipping checkpoint" in out and newest.name in out
    assert f"resuming from {ckpt_path(tmp_path, 3, layout).name}" in out
    # It continued from step 3 and re-did step 4 exactly.
    assert trainer.progress.step == 4
    assert torch.equal(weights(newest), straight)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flipped_byte_is_refused_by_the_checksum(tmp_path: Path, capsys, layout: str) -> None:
    make_trainer(tmp_path, max_steps=3, format=layout).fit()
    newest = ckpt_path(tmp_path, 3, layout)
    data = data_file(newest)
    good = data.read_bytes()
    straight = weights(newest)
    # Flip one bit inside the weight's tensor data (the 4 floats of linear.weight).
    raw = bytearray(good)
    at = good.find(straight.numpy().tobytes())
    assert at > 0
    raw[at + 1] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError, match=rf"{data.name}: sha256 .*does not match .* refusing"):
        read_checkpoint(newest)
    if layout == "single_file":
        # Without the checksum torch.load would have accepted it and silently changed a weight.
        sidecar = ckpt.checksum_path(newest)
        recorded = sidecar.read_text()
        sidecar.unlink()
        assert not torch.equal(weights(newest), straight)
        sidecar.write_text(recorded)
    # An explicit resume from that checkpoint is refused with the reason; auto-resume falls back.
    with pytest.raises(CheckpointCorruptError, match=data.name):
        make_trainer(tmp_path, max_steps=3, resume=str(newest), format=layout).fit()
    trainer = make_trainer(tmp_path, max_steps=3, format=layout)
    trainer.fit()
    assert f"resuming from {ckpt_path(tmp_path, 2, layout).name}" in capsys.readouterr().out
    assert torch.equal(weights(newest), straight)  # step 3 re-done and written again, checksum and all
    # Nothing loadable at all: say so, listing every checkpoint, instead of silently starting over.
    for step in (1, 2, 3):
        data_file(ckpt_path(tmp_path, step, layout)).write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"no checkpoint can be loaded: step_00000003.*step_00000001"):
        make_trainer(tmp_path, max_steps=3, format=layout).fit()


def test_resumed_run_does_not_repeat_log_lines(tmp_path: Path) -> None:
    make_trainer(tmp_path, max_steps=6, every_steps=3, format="sharded").fit()
    # A crash after step 5 was logged but before its checkpoint: only step 3 is on disk.
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000006")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000003\n")
    make_trainer(tmp_path, max_steps=6, every_steps=3, format="sharded").fit()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if line["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    superseded = [json.loads(line)["step"] for line in (tmp_path / "log.superseded.jsonl").read_text().splitlines()]
    assert superseded == [4, 5, 6]  # the first run's later lines are kept aside, not lost


def test_single_file_checkpoints_resume_into_a_sharded_run(tmp_path: Path) -> None:
    """Backward compatible: a run saved in the old single-file format continues with sharded checkpoints."""
    make_trainer(tmp_path / "straight", max_steps=4, format="single_file").fit()
    make_trainer(tmp_path / "mixed", max_steps=2, format="single_file").fit()
    trainer = make_trainer(tmp_path / "mixed", max_steps=4, format="sharded")
    trainer.fit()
    assert CheckpointManager(tmp_path / "mixed" / "checkpoints").steps() == [1, 2, 3, 4]
    assert (tmp_path / "mixed" / "checkpoints" / "step_00000002.pt").is_file()
    assert (tmp_path / "mixed" / "checkpoints" / "step_00000004").is_dir()
    straight = read_checkpoint(tmp_path / "straight" / "checkpoints" / "step_00000004.pt")
    mixed = read_checkpoint(tmp_path / "mixed" / "checkpoints" / "step_00000004")
    for key in ("linear.weight", "linear.bias"):
        assert torch.equal(straight["model"]["replicated"][key], mixed["model"]["replicated"][key])
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(straight["optimizer"]["state"][key][moment], mixed["optimizer"]["state"][key][moment])
    assert mixed["progress"]["step"] == 4
