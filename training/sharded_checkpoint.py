"""Sharded training checkpoints with torch.distributed.checkpoint (DCP): each rank writes its own rows.

One checkpoint is a directory `step_XXXXXXXX/`:

    .metadata, __<r>_<i>.distcp   DCP's files: every tensor. Replicated tensors (the backbone and its
                                  AdamW state) are written by rank 0; row-sharded ones (Partial FC
                                  centres, the PCO bank, the centres' AdamW moments) by the rank that
                                  owns the rows, as chunks placed at their global row offset (DCP's
                                  `CheckpointableTensor` protocol on a plain local tensor);
    meta.pt                       the small rest, from rank 0: format, progress, LR schedule, gradient
                                  scaler, every rank's RNG states, optimizer hyper-parameters, the
                                  non-tensor model state, and the layout (which keys hold rows);
    manifest.json                 sha256 and size of every file above, written last.

Nothing is gathered: saving costs each rank its own shard, where the single-file format gathered all
C rows of the centres and their moments on every rank. Loading on any number of ranks reshards: each
rank asks DCP for the rows [class_start, class_start + num_local) of its new shard and reads only
the chunks that overlap them, straight into its parameters. A checkpoint of another number of
classes (or another model) fails before anything is loaded, naming the directory and the key.

The directory is written as `.step_XXXXXXXX.tmp/` and renamed when every rank has finished and the
manifest is on disk, so a checkpoint directory without the dot is always complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

from lvface_mm.distributed import all_reduce_max, collective_device, get_rank, get_world_size, is_distributed

from .checkpoint import (
    CheckpointCorruptError,
    CheckpointWriteError,
    _fsync_dir,
    _indexed_params,
    _param_names,
    _state_by_name,
    _under,
    _write_error,
    atomic_write_bytes,
    file_sha256,
    load_formatted,
    load_optimizer_state,
    sharded_modules,
)

FORMAT = "lvface_mm.training/2"
META_FILE = "meta.pt"
_NEARLY_FULL_BYTES = 64 << 20  # a failed write with less free space than this is a full disk
MANIFEST_FILE = "manifest.json"


# -- rows as DCP chunks --------------------------------------------------------------------------------
def _rows(local: Tensor, start: int, num_rows: int) -> Tensor:
    """`local` (rows [start, start + n) of a (num_rows, ...) tensor) as a DCP chunk at its global offset.

    Returns an alias sharing `local`'s storage: DCP writes from it and loads into it in place.
    """
    view = local.detach()
    view.global_shape = (num_rows, *local.shape[1:])
    if local.shape[0] == 0:  # a rank that owns no rows contributes no chunk
        view.global_offsets, view.local_offsets, view.local_sizes = (), (), ()
    else:
        view.global_offsets = ((start,) + (0,) * (local.dim() - 1),)
        view.local_offsets = ((0,) * local.dim(),)
        view.local_sizes = (tuple(local.shape),)
    return view


def _check_sharded_module(name: str, module: nn.Module) -> None:
    for attr in ("class_start", "num_local", "local_state", "load_local_state"):
        if not hasattr(module, attr):
            raise TypeError(f"sharded module {name!r} ({type(module).__name__}) has no {attr!r}: it cannot be "
                            "saved as rows; use checkpoint.format=single_file")


def _is_row_state(value: object, param: Tensor) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape == param.shape


# -- save ----------------------------------------------------------------------------------------------
def _state_to_save(task: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors for DCP, small things for meta.pt) of this rank; no communication."""
    rank = get_rank()
    sharded = sharded_modules(task)
    tensors: dict[str, Tensor] = {}
    model_other, layout = {}, {}
    for key, value in task.state_dict().items():
        if _under(key, sharded) is not None:
            continue
        if not isinstance(value, Tensor):
            model_other[key] = value  # `_extra_state` (the PCO stage scheduler)
        elif rank == 0:  # replicated: rank 0's copy, as the single-file format (BatchNorm statistics are per rank)
            tensors[f"model/{key}"] = value.detach()
    sharded_other = {}
    for name, module in sharded.items():
        _check_sharded_module(name, module)
        rows, other = module.local_state()
        for key, value in rows.items():
            tensors[f"sharded/{name}/{key}"] = _rows(value, module.class_start, module.num_classes)
        sharded_other[name] = {k: v.detach().cpu().clone() for k, v in other.items()}
        layout[name] = {"num_classes": module.num_classes, "rows": sorted(rows)}
    entries, groups = _state_by_name(optimizer, task)
    optim_other: dict[str, dict[str, Any]] = {}
    for name, param, per_param in entries:
        owner = _under(name, sharded)
        optim_other[name] = {}
        for key, value in per_param.items():
            if owner is not None and _is_row_state(value, param):
                module = sharded[owner]
                tensors[f"optim/{name}/{key}"] = _rows(value, module.class_start, module.num_classes)
            elif isinstance(value, Tensor):
                if rank == 0:
                    tensors[f"optim/{name}/{key}"] = value.detach()
            else:
                optim_other[name][key] = value
    meta = {"model_other": model_other, "sharded_other": sharded_other, "layout": layout,
            "optimizer": {"param_groups": groups, "other": optim_other}}
    return tensors, meta


def _temp_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


def _dcp_write_failure(exc: BaseException, directory: Path) -> OSError | None:
    """The OSError behind a failed DCP save, if there is one. DCP gathers every rank's exception
    (as (exception, traceback) pairs in `CheckpointException.failures`); torch.save inside it turns a failed file write
    into "enforce fail at inline_container.cc", which is taken for a full disk when little space is left."""
    seen: list[Any] = [exc]
    while seen:
        err = seen.pop()
        if isinstance(err, tuple) and err:  # DCP's wrapped (exception, traceback) pairs
            err = err[0]
        if isinstance(err, OSError):
            return err
        if not isinstance(err, BaseException):
            continue
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict):
            seen.extend(failures.values())
        seen.extend(e for e in (err.__cause__, err.__context__) if e is not None)
        if isinstance(err, RuntimeError) and "inline_container" in str(err):
            try:
                free = shutil.disk_usage(directory).free
            except OSError:
                free = 0
            if free < _NEARLY_FULL_BYTES:
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def save_sharded(
    task: nn.Module, optimizer: torch.optim.Optimizer, final: Path, meta: dict[str, Any]
) -> None:
    """Write the checkpoint directory `final` (collective: every rank calls it).

    `meta` holds the loop's small state (format, progress, scheduler, scaler, rng, extra); it is
    written by rank 0 with the layout. Raises `CheckpointWriteError` on every rank if any rank's write
    failed; the temporary directory is then removed and `final` is not created.
    """
    rank, world = get_rank(), get_world_size()
    tmp = _temp_dir(final)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if is_distributed():
        dist.barrier()
    tensors, own_meta = _state_to_save(task, optimizer)
    error: OSError | None = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            metadata = dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not is_distributed())
        # Each rank hashes a share of DCP's files; rank 0 adds meta.pt and writes the manifest.
        files = sorted({info.relative_path for info in metadata.storage_data.values()} | {".metadata"})
        digests = {name: file_sha256(tmp / name) for name in files[rank::world]}
    except (Exception, dcp.CheckpointException) as exc:  # DCP's is a BaseException
        cause = _dcp_write_failure(exc, tmp)
        if cause is None:
            raise
        error = _write_error(tmp, cause)
        digests = {}
    if is_distributed():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (digests, str(error) if error else None))
        for other_digests, other_error in gathered:
            digests.update(other_digests)
            if other_error and error is None:
                error = CheckpointWriteError(other_error)
    if error is None and rank == 0:
        try:
            meta_digest = atomic_write_bytes(tmp / META_FILE, lambda f: torch.save({**meta, **own_meta}, f))
            digests[META_FILE] = meta_digest
            listing = {k: {"sha256": d, "size": n} for k, (d, n) in sorted(digests.items())}
            manifest = {"format": FORMAT, "files": listing}
            atomic_write_bytes(tmp / MANIFEST_FILE, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            if final.exists():  # the same step saved again (a rerun): the new one replaces it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            error = exc if isinstance(exc, CheckpointWriteError) else _write_error(tmp, exc)
    if is_distributed():
        failed = all_reduce_max(torch.tensor([float(error is not None)], device=collective_device()))
        if failed.item() > 0 and error is None:
            error = CheckpointWriteError(f"rank 0 could not finish the checkpoint {final}")
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        message = str(error) if not isinstance(error, OSError) or not error.strerror else error.strerror
        raise CheckpointWriteError(getattr(error, "errno", None) or 0, message.replace(str(tmp), str(final)))


# -- verify and read -----------------------------------------------------------------------------------
def verify_manifest(directory: Path, share: tuple[int, int] = (0, 1)) -> None:
    """Check the files of `directory` against its manifest; with share=(rank, world) only every
    world-th file from rank on, so that ranks split the reading.

    Raises:
        CheckpointCorruptError: a file is missing, has another size or another sha256.
    """
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointCorruptError(f"{directory}: no readable {MANIFEST_FILE} ({exc}); not a complete checkpoint") \
            from exc
    rank, world = share
    for name in sorted(files)[rank::world]:
        path = directory / name
        if not path.is_file():
            raise CheckpointCorruptError(f"{directory}: {name} is missing")
        digest, size = file_sha256(path)
        if size != files[name]["size"]:
            raise CheckpointCorruptError(f"{path}: {size} bytes, {files[name]['size']} were written (truncated?)")
        if digest != files[name]["sha256"]:
            raise CheckpointCorruptError(f"{path}: sha256 does not match the one recorded when it was written "
                                         "(the file is corrupt); refusing to load it")


def read_meta(directory: Path) -> dict[str, Any]:
    return load_formatted(directory / META_FILE, FORMAT, unreadable=f"{directory}: unreadable {META_FILE}",
                          name=directory)


def _dcp_load(tensors: dict[str, Tensor], directory: Path, single_process: bool) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(directory), no_dist=single_process)


def _saved_shapes(directory: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    md = dcp.FileSystemReader(directory).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}


def read_sharded_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The whole checkpoint in this process, in the single-file format's layout (full rows).

    For inspection, tests and exports: it needs memory for everything; training resumes with
    `load_sharded` instead, which reads only each rank's rows.
    """
    directory = Path(directory)
    verify_manifest(directory)
    meta = read_meta(directory)
    tensors = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in _saved_shapes(directory).items()}
    _dcp_load(tensors, directory, single_process=True)
    model = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    model.update(meta["model_other"])
    sharded = {name: {**meta["sharded_other"][name],
                      **{key: tensors[f"sharded/{name}/{key}"] for key in spec["rows"]}}
               for name, spec in meta["layout"].items()}
    state = {name: dict(other) for name, other in meta["optimizer"]["other"].items()}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, item = key.removeprefix("optim/").rsplit("/", 1)
            state.setdefault(name, {})[item] = value
    rest = {k: v for k, v in meta.items() if k not in ("model_other", "sharded_other", "layout", "optimizer")}
    return {**rest, "model": {"replicated": model, "sharded": sharded},
            "optimizer": {"state": state, "param_groups": meta["optimizer"]["param_groups"]}}


def load_sharded(task: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, meta: dict[str, Any]) -> None:
    """Load a checkpoint directory saved on any number of ranks into this rank's task and optimizer.

    Collective. Replicated tensors are read into the task's own tensors; each sharded module's rows
    [class_start, class_start + num_local) are read into its parameters and buffers, whatever the
    world size at save time.

    Raises:
        ValueError: the checkpoint does not fit the task (keys, shapes, number of classes), naming
            the directory and the first problems; nothing has been loaded then.
    """
    source = str(directory)
    saved = _saved_shapes(directory)
    sharded = sharded_modules(task)
    if set(meta["layout"]) != set(sharded):
        raise ValueError(f"{source}: checkpoint has sharded modules {sorted(meta['layout'])}, the task has "
                         f"{sorted(sharded)}")
    tensors: dict[str, Tensor] = {}
    replicated = {k: v for k, v in task.state_dict().items() if _under(k, sharded) is None}
    for key, value in replicated.items():
        if isinstance(value, Tensor):
            tensors[f"model/{key}"] = value.detach()  # loaded in place
    local_rows = {}
    for name, module in sharded.items():
        _check_sharded_module(name, module)
        spec = meta["layout"][name]
        if spec["num_classes"] != module.num_classes:
            raise ValueError(f"{source}: sharded module {name!r} was saved with {spec['num_classes']} classes, this "
                             f"run has {module.num_classes} (data.num_classes / another training set?); "
                             "nothing was loaded")
        rows, _ = module.local_state()
        local_rows[name] = rows
        for key, value in rows.items():
            tensors[f"sharded/{name}/{key}"] = _rows(value, module.class_start, module.num_classes)
    names = _param_names(task)
    params = _indexed_params(optimizer)
    by_name = {names[id(p)]: p for p in params}
    optim_tensors: dict[str, dict[str, Tensor]] = {}
    for key, (shape, dtype) in saved.items():
        if not key.startswith("optim/"):
            continue
        name, item = key.removeprefix("optim/").rsplit("/", 1)
        param = by_name.get(name)
        if param is None:
            continue  # reported below by load_optimizer_state's name check
        owner = _under(name, sharded)
        if owner is not None and len(shape) == param.dim() and shape[1:] == param.shape[1:] and param.dim():
            module = sharded[owner]
            value = _rows(torch.zeros(param.shape, dtype=dtype), module.class_start, module.num_classes)
        else:
            value = torch.zeros(shape, dtype=dtype)
        optim_tensors.setdefault(name, {})[item] = value
        tensors[key] = value
    _check_against_saved(tensors, saved, source)
    saved_names = sorted(n for g in meta["optimizer"]["param_groups"] for n in g["params"])
    if saved_names != sorted(by_name):
        only_saved = sorted(set(saved_names) - set(by_name))[:5]
        only_here = sorted(set(by_name) - set(saved_names))[:5]
        raise ValueError(f"{source}: optimizer parameters differ from the checkpoint (only in checkpoint: "
                         f"{only_saved}, only here: {only_here}); nothing was loaded")
    _dcp_load(tensors, directory, single_process=not is_distributed())
    result = task.load_state_dict({**{k: tensors[f"model/{k}"] for k in replicated if f"model/{k}" in tensors},
                                   **meta["model_other"]}, strict=False)
    missing = [k for k in result.missing_keys if _under(k, sharded) is None]
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: the model does not match the checkpoint: missing keys {missing[:8]}, "
                         f"unexpected keys {list(result.unexpected_keys)[:8]}")
    for name, module in sharded.items():
        module.load_local_state(local_rows[name], meta["sharded_other"][name])
    state = {name: {**meta["optimizer"]["other"].get(name, {}), **optim_tensors.get(name, {})}
             for name in set(meta["optimizer"]["other"]) | set(optim_tensors)}
    state = {name: value for name, value in state.items() if value}
    load_optimizer_state(optimizer, task, {"state": state, "param_groups": meta["optimizer"]["param_groups"]},
                         source, rows_are_local=True)


def _check_against_saved(tensors: dict[str, Tensor], saved: dict[str, tuple], source: str) -> None:
    """Every requested tensor exists in the checkpoint with the same global shape (clear error first)."""
    missing = sorted(k for k in tensors if k not in saved)
    wanted = {k for k in tensors}
    unexpected = sorted(k for k in saved if k.startswith(("model/", "sharded/")) and k not in wanted)
    wrong = []
    for key, value in tensors.items():
        if key in saved:
            shape = tuple(getattr(value, "global_shape", value.shape))
            if shape != saved[key][0]:
                wrong.append(f"{key}: saved {saved[key][0]}, here {shape}")
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: the checkpoint does not match this model/head: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}, other shapes {wrong[:6]} (another model, head, LoRA "
                         "setting or number of classes?); nothing was loaded")


__all__ = [
    "FORMAT",
    "load_sharded",
    "read_meta",
    "read_sharded_checkpoint",
    "save_sharded",
    "verify_manifest",
]
