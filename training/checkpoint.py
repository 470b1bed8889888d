"""Training checkpoints that do not depend on the number of processes, written atomically.

One file per checkpoint, written by rank 0, holding everything a run needs to continue exactly:

    model       replicated parameters and buffers (rank 0's copy) plus, for every sharded module of
                the task, its full world-size independent state (`full_state_dict()`: all class
                centres, PCO bank and stage);
    optimizer   the optimizer state keyed by parameter name; the per-row state of sharded
                parameters (AdamW moments of the class centres) is gathered to full rows;
    scheduler, scaler, progress (step, epoch, samples consumed in the epoch, global batch),
    rng         every rank's Python, NumPy, torch (and CUDA) generator states,
    extra       whatever the program adds (the resolved config).

Loading on any number of ranks slices the full rows again (`slice_rows`), so a run stopped on 2
processes resumes on 1 or 4 with the same model, centres and moments. RNG states are restored
only when the world size is unchanged (there is no meaningful mapping otherwise).

A sharded module is a submodule named by the task's `sharded_modules()` that has `num_classes`,
`group`, `full_state_dict()` and `load_full_state_dict(state)`, and whose parameters are split by
rows (`lvface_mm.distributed.shard_range`). Partial FC and the PCO head are.

Files are written to a temporary name, fsync'd and renamed, then the `latest` pointer is replaced
the same way, so a crash at any moment leaves the previous checkpoint intact and `latest` valid.

Robustness:
    - the sha256 and size of every checkpoint file go to a sidecar `step_N.pt.sha256`, written
      before the checkpoint is renamed into place; loading checks them, so a flipped byte in tensor
      data (which `torch.load` would accept) is refused with `CheckpointCorruptError`;
    - temporary files of a save that was killed (`.step_N.pt.*.tmp`) are removed at the next save
      and when a run starts;
    - a full disk gives `CheckpointWriteError: disk full while writing <file>; last good checkpoint:
      step_N.pt` instead of torch's "enforce fail at inline_container.cc", and leaves every
      finished checkpoint as it was;
    - `CheckpointManager.load_newest` (auto-resume) falls back from a truncated or corrupt newest
      checkpoint to the next older good one, with a warning naming what was skipped and why.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lvface_mm.distributed import gather_rows, get_rank, get_world_size, is_distributed, slice_rows

FORMAT = "lvface_mm.training/1"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMP_FILE = re.compile(r"^\..+\.tmp$")  # what atomic_write_bytes leaves behind when killed
CHECKSUM_SUFFIX = ".sha256"
_HASH_CHUNK = 1 << 22


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); earlier checkpoints are intact."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's bytes do not match the checksum recorded when it was written."""


# -- files -----------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter(io.RawIOBase):
    """A binary file wrapper that hashes what goes through it and remembers the first OSError.

    torch.save turns an exception of the file's `write` into "enforce fail at inline_container.cc";
    keeping the original lets the caller say "disk full" instead.
    """

    def __init__(self, raw: io.BufferedWriter) -> None:
        super().__init__()
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            written = self.raw.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        view = memoryview(data).cast("B")[:written]
        self.sha256.update(view)
        self.size += written
        return written

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def _write_error(path: Path, exc: OSError) -> CheckpointWriteError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointWriteError(exc.errno, f"disk full while writing {path}")
    return CheckpointWriteError(exc.errno, f"could not write {path}: {exc.strerror or exc}")


def atomic_write_bytes(
    path: Path, write: Any, before_replace: Callable[[str, int], None] | None = None
) -> tuple[str, int]:
    """Call `write(file)` on a temporary file next to `path`, fsync it, then rename it to `path`.

    `before_replace(sha256_hex, size)` runs after the data is on disk and before the rename (the
    checksum sidecar is written there). Returns (sha256 hex, size). An OSError while writing
    (including one torch.save wraps in a RuntimeError) raises `CheckpointWriteError`; the temporary
    file is removed and `path` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(path, exc) from exc
    writer = None
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = _HashingWriter(raw)
            write(writer)
            writer.flush()
            os.fsync(raw.fileno())
        digest, size = writer.sha256.hexdigest(), writer.size
        if before_replace is not None:
            before_replace(digest, size)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        error = writer.error if writer is not None and writer.error is not None else exc
        if isinstance(error, OSError) and not isinstance(error, CheckpointWriteError):
            raise _write_error(path, error) from exc
        raise
    _fsync_dir(path.parent)
    return digest, size


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write_bytes(Path(path), lambda f: torch.save(obj, f))


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def file_sha256(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in 4 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def verify_checksum(path: Path) -> bool:
    """Check `path` against its sidecar. False when there is none (older checkpoints).

    Raises:
        CheckpointCorruptError: size or sha256 differ from what was recorded at save time.
    """
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return False
    try:
        expected, expected_size = sidecar.read_text().split()[:2]
        expected_size = int(expected_size)
    except (ValueError, OSError) as exc:
        raise CheckpointCorruptError(f"{sidecar}: unreadable checksum file ({exc})") from exc
    actual, size = file_sha256(path)
    if size != expected_size:
        raise CheckpointCorruptError(
            f"{path}: {size} bytes, {expected_size} were written (truncated or overwritten); refusing to load it"
        )
    if actual != expected:
        raise CheckpointCorruptError(
            f"{path}: sha256 {actual[:16]}... does not match {expected[:16]}... recorded when it was written "
            "(the file is corrupt); refusing to load it"
        )
    return True


class CheckpointManager:
    """Checkpoints of one run in one directory, a `latest` pointer, the newest `keep_last` kept.

    `layout="sharded"` writes `step_XXXXXXXX/` directories with torch.distributed.checkpoint
    (`training.sharded_checkpoint`, every rank writes its rows); `"single_file"` writes
    `step_XXXXXXXX.pt` from rank 0. Both are read, whichever the run writes.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3, layout: str = "single_file") -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if layout not in ("sharded", "single_file"):
            raise ValueError(f"layout must be 'sharded' or 'single_file', got {layout!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.layout = layout

    def path_for(self, step: int) -> Path:
        suffix = "" if self.layout == "sharded" else ".pt"
        return self.directory / f"step_{step:08d}{suffix}"

    def _entries(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint present, files and directories, oldest first."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.iterdir():
            # step_N.pt files (single-file layout) and step_N/ directories (sharded layout)
            m = _STEP_FILE.match(p.name) if p.is_file() else _STEP_DIR.match(p.name) if p.is_dir() else None
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out, key=lambda e: (e[0], e[1].name))

    def steps(self) -> list[int]:
        return sorted({step for step, _ in self._entries()})

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the `latest` pointer, or the highest step file."""
        candidates = self.candidates()
        return candidates[0] if candidates else None

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, best first: the `latest` pointer's target, then steps newest first."""
        out = [path for _, path in reversed(self._entries())]
        pointer = self.directory / "latest"
        if pointer.is_file():
            try:
                target = self.directory / pointer.read_text().strip()
            except (OSError, UnicodeDecodeError):
                target = None
            if target is not None and target in out:
                out = [target] + [p for p in out if p != target]
        return out

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete temporary files a killed save left in the directory (rank 0, no save running)."""
        if not self.directory.is_dir():
            return []
        stale = [p for p in self.directory.iterdir() if _TEMP_FILE.match(p.name)]
        # A sidecar is written just before its checkpoint is renamed into place: alone, it is a leftover.
        stale += [p for p in self.directory.glob(f"step_*.pt{CHECKSUM_SUFFIX}")
                  if not p.with_name(p.name.removesuffix(CHECKSUM_SUFFIX)).exists()]
        for path in stale:
            _remove(path)
        return stale

    def read(self, path: Path, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
        """Verify and read `path`: a single-file checkpoint's payload, or a sharded one's meta (this
        rank checks its `share` of the files against the manifest)."""
        if path.is_dir():
            from .sharded_checkpoint import read_meta, verify_manifest

            verify_manifest(path, share)
            return read_meta(path)
        return read_checkpoint(path)

    def load_newest(
        self, warn: Callable[[str], None] = print, read: Callable[[Path], dict[str, Any]] | None = None
    ) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that reads and verifies, falling back past bad ones with a warning.

        `read(path)` verifies and reads one checkpoint (default `self.read`; the training loop passes
        one that agrees across ranks). Returns None when the directory holds no checkpoint.

        Raises:
            ValueError: checkpoints exist but none of them can be loaded (each reason is listed).
        """
        problems = []
        read = self.read if read is None else read
        for path in self.candidates():
            try:
                payload = read(path)
            except (ValueError, OSError) as exc:
                problems.append(f"{path.name}: {exc}")
                warn(f"warning: skipping checkpoint {path} ({exc}); trying the next older one")
                continue
            if problems:
                warn(f"warning: resuming from {path.name}, older than the newest checkpoint "
                     f"({len(problems)} newer one(s) could not be loaded)")
            return path, payload
        if problems:
            raise ValueError(f"{self.directory}: no checkpoint can be loaded: " + "; ".join(problems))
        return None

    def save(self, payload: dict[str, Any], step: int) -> Path:
        """Write `payload` as the checkpoint of `step` (call on rank 0 only), update `latest`, prune.

        Raises:
            CheckpointWriteError: the disk is full (or another write error); the message names the
                last good checkpoint, which is untouched.
        """
        self.remove_stale_temp_files()
        path = self.path_for(step)

        def write_sidecar(digest: str, size: int) -> None:
            text = f"{digest} {size} {path.name}\n"
            atomic_write_bytes(checksum_path(path), lambda f: f.write(text.encode()))

        with self._naming_last_good(path):
            atomic_write_bytes(path, lambda f: torch.save(payload, f), before_replace=write_sidecar)
            atomic_write_bytes(self.directory / "latest", lambda f: f.write(f"{path.name}\n".encode()))
        self._prune(step)
        return path

    def save_sharded(
        self, task: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any], step: int
    ) -> Path:
        """Write the sharded checkpoint of `step` (collective: every rank calls it), then on rank 0
        update `latest` and prune. Raises `CheckpointWriteError` on every rank if any write failed."""
        from .sharded_checkpoint import save_sharded

        path = self.path_for(step)
        if get_rank() == 0:
            self.remove_stale_temp_files()
        with self._naming_last_good(path):
            save_sharded(task, optimizer, path, meta)
            if get_rank() == 0:
                atomic_write_bytes(self.directory / "latest", lambda f: f.write(f"{path.name}\n".encode()))
        if get_rank() == 0:
            self._prune(step)
        return path

    @contextmanager
    def _naming_last_good(self, path: Path) -> Iterator[None]:
        """A failed write of `path` says which checkpoint a restart would resume from."""
        try:
            yield
        except CheckpointWriteError as exc:
            last = next((p.name for p in self.candidates() if p != path), None)
            raise CheckpointWriteError(
                exc.errno, f"{exc.strerror}; last good checkpoint: {last or 'none yet'} (nothing saved was changed)"
            ) from exc

    def _prune(self, step: int) -> None:
        keep = set(self.steps()[-self.keep_last :]) | {step}
        for old, path in self._entries():
            if old not in keep:
                _remove(path)
                checksum_path(path).unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint (plain data and tensors only: no code runs on load).

    A sharded checkpoint (a `step_N/` directory) is assembled whole in this process, in the same
    layout as a single file (full rows): for inspection and tests.

    Raises:
        CheckpointCorruptError: the bytes differ from the checksum recorded at save time.
        ValueError: not a readable training checkpoint (truncated, another format).
    """
    path = Path(path)
    if path.is_dir():
        from .sharded_checkpoint import read_sharded_checkpoint

        return read_sharded_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    verify_checksum(path)
    return load_formatted(path, FORMAT, unreadable=f"{path}: not a readable training checkpoint")


def load_formatted(path: Path, expected: str, *, unreadable: str, name: Path | None = None) -> dict[str, Any]:
    """`torch.load` (tensors only) of a dict whose "format" is `expected`; else a ValueError that
    starts with `unreadable` (a file torch cannot read) or names `name` (default `path`)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{unreadable} ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != expected:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{name or path}: not a {expected} training checkpoint (format: {found!r})")
    return payload


# -- model -------------------------------------------------------------------------------------------
def sharded_modules(task: nn.Module) -> dict[str, nn.Module]:
    """The task's row-sharded submodules by name (empty for tasks without any)."""
    get = getattr(task, "sharded_modules", None)
    modules = dict(get()) if callable(get) else {}
    for name, module in modules.items():
        for attr in ("num_classes", "full_state_dict", "load_full_state_dict"):
            if not hasattr(module, attr):
                raise TypeError(f"sharded module {name!r} ({type(module).__name__}) has no {attr!r}")
    return modules


def _under(name: str, prefixes: dict[str, nn.Module]) -> str | None:
    return next((p for p in prefixes if name == p or name.startswith(p + ".")), None)


def model_state(task: nn.Module) -> dict[str, Any]:
    """World-size independent model state. Collective when the task has sharded modules."""
    sharded = sharded_modules(task)
    replicated = {
        k: v.detach().cpu() if isinstance(v, torch.Tensor) else v  # `_extra_state` entries are plain data
        for k, v in task.state_dict().items()
        if _under(k, sharded) is None
    }
    return {"replicated": replicated, "sharded": {name: m.full_state_dict() for name, m in sharded.items()}}


def load_model_state(task: nn.Module, state: dict[str, Any], source: str = "checkpoint") -> None:
    """Load `model_state` output saved on any world size into this rank's task (strict)."""
    sharded = sharded_modules(task)
    result = task.load_state_dict(state["replicated"], strict=False)
    missing = [k for k in result.missing_keys if _under(k, sharded) is None]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{source}: the model does not match the checkpoint: missing keys {missing[:8]}, unexpected keys "
            f"{list(result.unexpected_keys)[:8]} (was it saved with another model, head or LoRA setting?)"
        )
    saved = state.get("sharded", {})
    if set(saved) != set(sharded):
        raise ValueError(f"{source}: checkpoint has sharded modules {sorted(saved)}, the task has {sorted(sharded)}")
    for name, module in sharded.items():
        try:
            module.load_full_state_dict(saved[name])
        except ValueError as exc:  # e.g. another number of classes: name the file
            raise ValueError(f"{source}: sharded module {name!r} does not fit the checkpoint: {exc}") from exc


# -- optimizer ---------------------------------------------------------------------------------------
def _indexed_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _param_names(task: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in task.named_parameters()}


def _state_by_name(
    optimizer: torch.optim.Optimizer, task: nn.Module
) -> tuple[list[tuple[str, nn.Parameter, dict[str, Any]]], list[dict[str, Any]]]:
    """Torch's optimizer state keyed by parameter name instead of index, so any world size and any
    parameter order can load it: (name, parameter, its state) per parameter, and the param groups
    with names in `params`."""
    names = _param_names(task)
    torch_state = optimizer.state_dict()
    entries = []
    for index, param in enumerate(_indexed_params(optimizer)):
        name = names.get(id(param))
        if name is None:
            raise ValueError("the optimizer holds a parameter that is not part of the task")
        entries.append((name, param, torch_state["state"].get(index, {})))
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [entries[i][0] for i in g["params"]]}
              for g in torch_state["param_groups"]]
    return entries, groups


def optimizer_state(optimizer: torch.optim.Optimizer, task: nn.Module) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, sharded rows gathered. Collective."""
    sharded = sharded_modules(task)
    entries, groups = _state_by_name(optimizer, task)
    state: dict[str, dict[str, Any]] = {}
    for name, param, per_param in entries:
        owner = _under(name, sharded)
        out: dict[str, Any] = {}
        for key, value in per_param.items():
            if owner is not None and isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim():
                module = sharded[owner]
                value = gather_rows(value, module.num_classes, getattr(module, "group", None))
            out[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
        state[name] = out
    return {"state": state, "param_groups": groups}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    task: nn.Module,
    saved: dict[str, Any],
    source: str = "checkpoint",
    rows_are_local: bool = False,
) -> None:
    """Load `optimizer_state` output saved on any world size; sharded rows are sliced for this rank
    (unless `rows_are_local`: they already are this rank's rows, as a sharded checkpoint loads them)."""
    sharded = sharded_modules(task)
    names = _param_names(task)
    params = _indexed_params(optimizer)
    index_of = {names[id(p)]: i for i, p in enumerate(params)}
    saved_names = [n for g in saved["param_groups"] for n in g["params"]]
    if sorted(saved_names) != sorted(index_of):
        only_saved = sorted(set(saved_names) - set(index_of))[:5]
        only_here = sorted(set(index_of) - set(saved_names))[:5]
        raise ValueError(
            f"{source}: optimizer parameters differ from the checkpoint (only in checkpoint: {only_saved}, only "
            f"here: {only_here}); was it saved with another model, head or LoRA setting?"
        )
    current_groups = optimizer.state_dict()["param_groups"]
    if len(current_groups) != len(saved["param_groups"]):
        raise ValueError(
            f"{source}: {len(saved['param_groups'])} optimizer param groups saved, {len(current_groups)} now"
        )
    torch_state: dict[int, dict[str, Any]] = {}
    for name, per_param in saved["state"].items():
        owner = _under(name, sharded)
        param = params[index_of[name]]
        out = {}
        for key, value in per_param.items():
            per_row = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[1:] == param.shape[1:]
            if owner is not None and per_row and not rows_are_local:
                value = slice_rows(value, getattr(sharded[owner], "group", None)).clone()
            out[key] = value
        torch_state[index_of[name]] = out
    groups = []
    for cur, old in zip(current_groups, saved["param_groups"]):
        if sorted(index_of[n] for n in old["params"]) != sorted(cur["params"]):
            raise ValueError(f"{source}: optimizer param groups are arranged differently from the checkpoint")
        # torch pairs saved and current parameters by position, so list them in the current order;
        # the state above is already keyed by the current indices.
        groups.append({**{k: v for k, v in old.items() if k != "params"}, "params": list(cur["params"])})
    optimizer.load_state_dict({"state": torch_state, "param_groups": groups})


# -- random number generators ------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's generator states as plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys).copy()), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def gather_rng() -> list[dict[str, Any]]:
    """Every rank's generator states, in rank order, on every rank. Collective."""
    mine = capture_rng()
    if not is_distributed():
        return [mine]
    # all_gather_object cannot carry tensors through its restricted unpickler: send byte strings.
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, _tensors_to_bytes(mine))
    return [_bytes_to_tensors(state) for state in out]


def _tensors_to_bytes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("__tensor__", str(value.dtype).removeprefix("torch."), value.cpu().numpy().tobytes())
    if isinstance(value, dict):
        return {k: _tensors_to_bytes(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors_to_bytes(v) for v in value)
    return value


def _bytes_to_tensors(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "__tensor__":
        return torch.frombuffer(bytearray(value[2]), dtype=getattr(torch, value[1])).clone()
    if isinstance(value, dict):
        return {k: _bytes_to_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_bytes_to_tensors(v) for v in value)
    return value


def rng_for_this_rank(saved: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The saved generator states of this rank, or None when the world size changed."""
    return saved[get_rank()] if len(saved) == get_world_size() else None


__all__ = [
    "FORMAT",
    "CheckpointCorruptError",
    "CheckpointManager",
    "CheckpointWriteError",
    "atomic_torch_save",
    "atomic_write_bytes",
    "capture_rng",
    "file_sha256",
    "verify_checksum",
    "gather_rng",
    "load_model_state",
    "load_optimizer_state",
    "model_state",
    "optimizer_state",
    "read_checkpoint",
    "restore_rng",
    "rng_for_this_rank",
    "sharded_modules",
]
