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
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lvface_mm.distributed import gather_rows, get_rank, get_world_size, is_distributed, slice_rows

FORMAT = "lvface_mm.training/1"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


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


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file next to `path`, fsync it, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write_bytes(Path(path), lambda f: torch.save(obj, f))


class CheckpointManager:
    """`step_XXXXXXXX.pt` files and a `latest` pointer in one directory; keeps the newest `keep_last`."""

    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}.pt"

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _STEP_FILE.match(p.name)))

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the `latest` pointer, or the highest step file."""
        pointer = self.directory / "latest"
        if pointer.is_file():
            target = self.directory / pointer.read_text().strip()
            if target.is_file():
                return target
        steps = self.steps()
        return self.path_for(steps[-1]) if steps else None

    def save(self, payload: dict[str, Any], step: int) -> Path:
        """Write `payload` as the checkpoint of `step` (call on rank 0 only), update `latest`, prune."""
        path = self.path_for(step)
        atomic_torch_save(payload, path)
        atomic_write_bytes(self.directory / "latest", lambda f: f.write(f"{path.name}\n".encode()))
        for old in self.steps()[: -self.keep_last]:
            if old != step:
                self.path_for(old).unlink(missing_ok=True)
        return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint (plain data and tensors only: no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable training checkpoint ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not a {FORMAT} training checkpoint (format: {found!r})")
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
        module.load_full_state_dict(saved[name])


# -- optimizer ---------------------------------------------------------------------------------------
def _indexed_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _param_names(task: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in task.named_parameters()}


def optimizer_state(optimizer: torch.optim.Optimizer, task: nn.Module) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, sharded rows gathered. Collective."""
    sharded = sharded_modules(task)
    names = _param_names(task)
    params = _indexed_params(optimizer)
    torch_state = optimizer.state_dict()
    state: dict[str, dict[str, Any]] = {}
    for index, param in enumerate(params):
        name = names.get(id(param))
        if name is None:
            raise ValueError("the optimizer holds a parameter that is not part of the task")
        per_param = torch_state["state"].get(index, {})
        owner = _under(name, sharded)
        out: dict[str, Any] = {}
        for key, value in per_param.items():
            if owner is not None and isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim():
                module = sharded[owner]
                value = gather_rows(value, module.num_classes, getattr(module, "group", None))
            out[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
        state[name] = out
    groups = []
    for group in torch_state["param_groups"]:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(params[i])] for i in group["params"]]})
    return {"state": state, "param_groups": groups}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, task: nn.Module, saved: dict[str, Any], source: str = "checkpoint"
) -> None:
    """Load `optimizer_state` output saved on any world size; sharded rows are sliced for this rank."""
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
            if owner is not None and per_row:
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
    "CheckpointManager",
    "atomic_torch_save",
    "atomic_write_bytes",
    "capture_rng",
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
