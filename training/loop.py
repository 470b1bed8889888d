"""The one training loop: any task, one or many processes, resumable to the sample.

A task is an `nn.Module` whose `forward(batch)` returns a dict of 0-dim tensors with a "loss";
the other entries are averaged and logged. Optional task methods:

    sharded_modules() -> {name: module}   row-sharded submodules (Partial FC centres): kept out of
                                           DDP and of gradient clipping, checkpointed in full;
    set_data_parallel(wrap | None)         required with sharded modules on several processes: the
                                           task wraps its replicated part (the backbone) with
                                           `wrap` (DDP) and calls it through the wrapper; None
                                           drops the wrappers. The task itself is not DDP-wrapped,
                                           so the sharded head never enters DDP;
    after_optimizer_step(step, epoch, metrics) -> dict
                                           called on every rank after each optimizer step with the
                                           rank-averaged metrics (PCO stage scheduling);

Hooks (`Hook`) run after every optimizer step and at the end (evaluation, exports).

FSDP (`training.fsdp`): a task holding `fully_shard` units (an LLM sharded by `training.adapter`)
is not DDP-wrapped. Its sharded gradients are reduce-scattered by FSDP on the last micro-batch of
a step, the gradients of its whole (unsharded) trainable parameters are averaged by one all-reduce,
clipping takes the global norm over both, and checkpoints gather full state dicts through
`torch.distributed.checkpoint.state_dict` into the usual single file.

One optimizer step: `grad_accum_steps` micro-batches, each loss divided by that count, DDP
gradient sync only on the last one; then (fp16) unscale, clip the replicated parameters'
gradient norm, step, update the scaler, advance the warm-up + polynomial schedule by one.
Before stepping, the averaged loss is checked on every rank: a NaN or inf stops training with
`NonFiniteLossError`, leaving parameters and the last checkpoint untouched.

Nothing here knows about faces: the face-recognition task lives in `lvface_mm.tasks`.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lvface_mm.distributed import all_reduce_max, all_reduce_mean, get_rank, get_world_size, is_distributed
from lvface_mm.models.inference import resolve_dtype

from .checkpoint import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointWriteError,
    atomic_write_bytes,
    gather_rng,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    restore_rng,
    rng_for_this_rank,
    sharded_modules,
)
from .config import CheckpointConfig, LoopConfig, OptimConfig
from .data import GlobalBatchSampler
from .fsdp import (
    clip_grad_norm_,
    full_training_state,
    is_dtensor,
    load_full_training_state,
    set_gradient_sync,
    sync_replicated_grads,
    uses_fsdp,
)
from .sharded_checkpoint import FORMAT as SHARDED_FORMAT
from .sharded_checkpoint import load_sharded


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; training stopped before the optimizer applied it."""


@dataclass
class Progress:
    """Where a run is: optimizer steps done, current epoch and global samples consumed in it."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0


class Hook(Protocol):
    """Called on every rank; either method may be left out. Returned scalars are logged as "eval"."""

    def on_step(self, trainer: Trainer, metrics: dict[str, float]) -> dict[str, float] | None: ...

    def on_end(self, trainer: Trainer) -> dict[str, float] | None: ...


# -- optimizer and schedule ----------------------------------------------------------------------------
def adamw_param_groups(
    model: nn.Module, weight_decay: float, exclude_norm_bias: bool, no_decay_names: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Trainable parameters split into decay / no-decay groups (no-decay: 1-d and named ones)."""
    skip = set(no_decay_names)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = exclude_norm_bias and (param.dim() <= 1 or name in skip or name.rsplit(".", 1)[-1] in skip)
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(model: nn.Module, config: OptimConfig, no_decay_names: Iterable[str] = ()) -> torch.optim.AdamW:
    groups = adamw_param_groups(model, config.weight_decay, config.exclude_norm_bias_from_decay, no_decay_names)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


class WarmupPolyDecay:
    """Learning rate per optimizer step: linear warm-up to the peak, then polynomial decay.

    Step s (0-based) uses peak * (s + 1) / warmup during warm-up, then
    peak * (min_ratio + (1 - min_ratio) * (1 - (s - warmup) / (total - warmup)) ** power).
    The whole schedule is a function of the step counter, so resuming only needs the step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        power: float = 1.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}), total >= 1")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.power = power
        self.min_lr_ratio = min_lr_ratio
        self.peak_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        remaining = max(0.0, 1.0 - (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * remaining**self.power

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def set_step(self, step: int) -> None:
        self.step_count = step
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


# -- logging -----------------------------------------------------------------------------------------
class RunLogger:
    """JSONL log (`log.jsonl`), TensorBoard events (`tb/`) and a tqdm bar, on rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, progress_bar: bool, total: int) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "log.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the `train` extra brings tensorboard; logging must not stop a run
                print("tensorboard is not installed; logging to log.jsonl only")
            else:
                self._tb = SummaryWriter(str(run_dir / "tb"))
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def set_progress(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def log(self, step: int, record: dict[str, Any], prefix: str = "train") -> None:
        if self._file is None:  # not rank 0, or closed
            return
        entry = {"step": step, "kind": prefix, **record, "time": time.time()}
        self._file.write(json.dumps(entry) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)
        if self._bar is not None and prefix == "train":
            shown = {k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "lr", "stage", "samples_per_s")}
            self._bar.set_postfix(shown, refresh=False)

    def rewind(self, step: int) -> int:
        """A run resumed at `step`: move log lines of later steps to `log.superseded.jsonl`.

        The resumed run logs those steps again; without this `log.jsonl` would hold two lines for
        each (nothing is deleted: the superseded lines keep their own file). Returns how many moved.
        """
        if self._file is None:
            return 0
        path = Path(self._file.name)
        self._file.close()
        kept, moved = [], []
        for line in path.read_text().splitlines(keepends=True):
            try:
                later = int(json.loads(line).get("step", -1)) > step
            except (ValueError, AttributeError, TypeError):  # a line cut short by a crash: keep it aside
                later = True
            (moved if later else kept).append(line if line.endswith("\n") else line + "\n")
        if moved:
            with open(path.with_name("log.superseded.jsonl"), "a") as f:
                f.writelines(moved)
            atomic_write_bytes(path, lambda f: f.write("".join(kept).encode()))
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 (closed in close())
        return len(moved)

    def message(self, text: str) -> None:
        if not self.enabled or self._file is None:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for closer in (self._bar, self._tb, self._file):
            if closer is not None:
                closer.close()
        self._bar = self._tb = self._file = None


# -- the loop ----------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    """Runs a task with the one loop. Build it on every rank after `init_process_group`.

    Args:
        task: the model + loss module, already on `device`.
        optimizer: over the task's trainable parameters (see `build_adamw`).
        dataset: map-style training set; items are looked up by the indices (or `(index, seed)`
            pairs when `with_seeds`) of a `GlobalBatchSampler`.
        batch_size: samples per rank per micro-batch.
        optim, loop, checkpoint: run-config sections.
        run_dir: where checkpoints (`checkpoints/`), `log.jsonl` and `tb/` go.
        device: where batches are moved.
        hooks: called after every optimizer step and at the end.
        num_workers: DataLoader workers per rank.
        with_seeds: pass per-sample augmentation seeds to the data set.
        data_seed: the data-order seed (same on every rank).
        extra_state: saved in every checkpoint under "extra" (e.g. the resolved config).
        collate_fn: DataLoader collate function (default: torch's stacking).
    """

    def __init__(
        self,
        task: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Dataset,
        batch_size: int,
        *,
        optim: OptimConfig,
        loop: LoopConfig,
        checkpoint: CheckpointConfig,
        run_dir: str | Path,
        device: torch.device,
        hooks: Sequence[Hook] = (),
        num_workers: int = 0,
        with_seeds: bool = False,
        data_seed: int = 0,
        extra_state: dict[str, Any] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.task, self.optimizer, self.device = task, optimizer, torch.device(device)
        self.loop_cfg, self.ckpt_cfg = loop, checkpoint
        self.run_dir = Path(run_dir)
        self.hooks = list(hooks)
        self.extra_state = extra_state or {}
        self.rank, self.world_size = get_rank(), get_world_size()
        self.progress = Progress()
        self.sampler = GlobalBatchSampler(len(dataset), batch_size, self.rank, self.world_size,
                                          loop.grad_accum_steps, data_seed, with_seeds=with_seeds)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True, num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            # A private generator: creating loader iterators must not consume the global torch RNG,
            # or a resumed run would draw different dropout/masking/sampling numbers.
            generator=torch.Generator(),
        )
        steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = loop.max_steps or loop.epochs * steps_per_epoch
        warmup = optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_epochs * steps_per_epoch)
        self.scheduler = WarmupPolyDecay(optimizer, self.total_steps, min(warmup, self.total_steps),
                                         optim.decay_power, optim.min_lr_ratio)
        self.clip_grad_norm = optim.clip_grad_norm
        self.autocast_dtype = None if loop.precision == "fp32" else resolve_dtype(loop.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=loop.precision == "fp16")
        self.sharded = sharded_modules(task)
        layout = checkpoint.format if checkpoint.format != "auto" else "sharded" if self.sharded else "single_file"
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", checkpoint.keep_last, layout)
        sharded_ids = {id(p) for m in self.sharded.values() for p in m.parameters()}
        self.replicated_params = [p for p in task.parameters() if p.requires_grad and id(p) not in sharded_ids]
        self.sharded_params = [p for p in task.parameters() if p.requires_grad and id(p) in sharded_ids]
        self.fsdp = uses_fsdp(task)
        if self.fsdp:
            if self.sharded:
                raise ValueError(f"{type(task).__name__}: FSDP units and row-sharded modules "
                                 f"({sorted(self.sharded)}) in one task are not supported")
            if layout != "single_file":
                raise ValueError("an FSDP task checkpoints full (gathered) state dicts: set checkpoint.format to "
                                 f"auto or single_file, not {checkpoint.format!r}")
        # FSDP: trainable parameters every rank holds whole (projector); their gradients are averaged here.
        self.fsdp_whole_params = [p for p in self.replicated_params if self.fsdp and not is_dtensor(p)]
        self._ddp: list[nn.Module] = []  # the DDP wrappers, for no_sync() during accumulation
        self.model = self._wrap_ddp(task)
        self.logger = RunLogger(self.run_dir, self.rank == 0, loop.tensorboard, loop.progress_bar, self.total_steps)
        self.last_saved_step: int | None = None

    @property
    def samples_per_step(self) -> int:
        return self.sampler.samples_per_step

    def _wrap_ddp(self, task: nn.Module) -> nn.Module:
        """DDP over the replicated parameters only: the whole task, or the part a task with sharded
        modules hands to `wrap` (sharded modules hold another slice on every rank: DDP must neither
        broadcast nor average them, and their gradients are already exact per shard)."""
        if self.world_size == 1 or self.fsdp:  # FSDP syncs the sharded gradients, the loop the whole ones
            return task
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers are not re-broadcast every forward (per-rank BatchNorm statistics, as arcface_torch);
        # newer torch spells this forward_sync_buffers.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        sharded_ids = {id(t) for m in self.sharded.values() for t in [*m.parameters(), *m.buffers()]}

        def wrap(module: nn.Module) -> nn.Module:
            if any(id(t) in sharded_ids for t in [*module.parameters(), *module.buffers()]):
                raise ValueError(f"set_data_parallel: the module given to DDP ({type(module).__name__}) holds "
                                 f"parameters of a sharded module ({sorted(self.sharded)})")
            ddp = DDP(module, device_ids=device_ids, find_unused_parameters=self.loop_cfg.find_unused_parameters,
                      **no_sync)
            self._ddp.append(ddp)
            return ddp

        if not self.sharded:
            return wrap(task)
        set_parallel = getattr(task, "set_data_parallel", None)
        if not callable(set_parallel):
            raise TypeError(
                f"{type(task).__name__} has sharded modules {sorted(self.sharded)} but no set_data_parallel(wrap): "
                "on several processes the loop needs it to put only the replicated part under DDP"
            )
        set_parallel(wrap)
        if not self._ddp:
            raise ValueError(f"{type(task).__name__}.set_data_parallel did not wrap anything with DDP")
        return task

    # -- checkpoints ---------------------------------------------------------------------------------
    def _run_state(self) -> dict[str, Any]:
        """Everything but the model and optimizer: what both checkpoint layouts store alike."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "progress": {**vars(self.progress), "samples_per_step": self.samples_per_step,
                         "world_size": self.world_size},
            "rng": gather_rng(),
            "extra": self.extra_state,
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current state (collective). Returns its path on rank 0."""
        if self.checkpoints.layout == "sharded":
            return self._save_sharded()
        if self.fsdp:  # gathered to rank 0, keyed like an unsharded run's
            model, optim = full_training_state(self.task, self.optimizer)
            model, optim = {"replicated": model, "sharded": {}}, optim
        else:
            model, optim = model_state(self.task), optimizer_state(self.optimizer, self.task)
        payload = {"format": "lvface_mm.training/1", "model": model, "optimizer": optim, **self._run_state()}
        path, error = None, None
        if self.rank == 0:
            try:
                path = self.checkpoints.save(payload, self.progress.step)
            except CheckpointWriteError as exc:
                error = exc
        if is_distributed():
            # Every rank learns whether rank 0's write failed (instead of waiting in the next collective).
            failed = all_reduce_max(torch.tensor([float(error is not None)], device=self.device))
            if error is None and failed.item() > 0:
                error = CheckpointWriteError(f"rank 0 could not write the checkpoint of step {self.progress.step}")
        if error is not None:
            raise error
        self.last_saved_step = self.progress.step
        if path is not None:
            self.logger.message(f"checkpoint: {path}")
        return path

    def _save_sharded(self) -> Path | None:
        """Every rank writes its own rows with torch.distributed.checkpoint (no gather)."""
        meta = {"format": SHARDED_FORMAT, **self._run_state()}
        path = self.checkpoints.save_sharded(self.task, self.optimizer, meta, self.progress.step)
        self.last_saved_step = self.progress.step
        if self.rank == 0:
            self.logger.message(f"checkpoint: {path}")
            return path
        return None

    def _read_agreed(self, path: Path) -> dict[str, Any]:
        """Verify and read a checkpoint; ranks share the verification of a sharded one and agree on
        the outcome (a damaged file seen by one rank makes every rank skip it)."""
        error, payload = None, None
        try:
            payload = self.checkpoints.read(path, share=(self.rank, self.world_size))
        except (ValueError, OSError) as exc:
            error = exc
        if is_distributed():
            bad = all_reduce_max(torch.tensor([float(error is not None)], device=self.device))
            if bad.item() > 0 and error is None:
                error = CheckpointCorruptError(f"{path}: another rank found it damaged or unreadable")
        if error is not None:
            raise error
        return payload

    def resume(self, path: str | Path, payload: dict[str, Any] | None = None) -> None:
        """Restore model, optimizer, schedule, scaler, data position and (same world size) RNG."""
        path = Path(path)
        if payload is None:
            if not path.exists():
                raise FileNotFoundError(f"checkpoint not found: {path}")
            payload = self._read_agreed(path)
        source = str(path)
        if path.is_dir():  # sharded: each rank reads its own rows
            load_sharded(self.task, self.optimizer, path, payload)
        elif self.fsdp:  # each rank keeps its own rows of the full state
            if payload["model"].get("sharded"):
                raise ValueError(f"{source}: holds row-sharded modules {sorted(payload['model']['sharded'])}, "
                                 "which an FSDP task does not have")
            load_full_training_state(self.task, self.optimizer, payload["model"]["replicated"],
                                     payload["optimizer"], source)
        else:
            load_model_state(self.task, payload["model"], source)
            load_optimizer_state(self.optimizer, self.task, payload["optimizer"], source)
        if payload.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(payload["scaler"])
        saved = payload["progress"]
        step = int(saved["step"])
        if saved["samples_per_step"] != self.samples_per_step:
            # Same number of samples seen, counted in the new global batch.
            step = round(step * saved["samples_per_step"] / self.samples_per_step)
            self.logger.message(f"global batch changed {saved['samples_per_step']} -> {self.samples_per_step}: "
                                f"step {saved['step']} continues as step {step}")
        self.progress = Progress(step, int(saved["epoch"]), int(saved["samples_in_epoch"]))
        self.scheduler.set_step(step)
        rng = rng_for_this_rank(payload["rng"])
        if rng is not None:
            restore_rng(rng)
        else:
            seed_everything(self.loop_cfg.seed + self.rank + 7919 * step)
            self.logger.message(f"world size changed {saved['world_size']} -> {self.world_size}: "
                                "random generators re-seeded from (seed, rank, step)")
        self.last_saved_step = self.progress.step
        moved = self.logger.rewind(step)
        self.logger.message(f"resumed from {source} at step {step}, epoch {self.progress.epoch}"
                            + (f" ({moved} later log lines moved to log.superseded.jsonl)" if moved else ""))

    def _maybe_resume(self) -> None:
        mode = self.ckpt_cfg.resume
        if self.rank == 0:
            for stale in self.checkpoints.remove_stale_temp_files():
                self.logger.message(f"removed {stale.name}, left by an interrupted checkpoint save")
        if is_distributed():
            dist.barrier()  # the other ranks list the directory only after the clean-up
        latest = self.checkpoints.latest()
        if mode == "never":
            if latest is not None:
                raise FileExistsError(
                    f"{self.run_dir} already holds checkpoints (newest: {latest}); set checkpoint.resume=auto to "
                    "continue that run, or choose another output_dir (nothing was overwritten)"
                )
            return
        if mode == "auto":
            # Newest checkpoint that loads and verifies; a truncated or corrupt one is skipped with a warning.
            found = self.checkpoints.load_newest(warn=self.logger.message, read=self._read_agreed)
            if found is not None:
                self.resume(*found)
            return
        self.resume(Path(mode))

    # -- one optimizer step --------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_backward(self, micro_batches: list[Any]) -> dict[str, float]:
        """Accumulate gradients over the micro-batches; returns rank-averaged metrics."""
        accum = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            with contextlib.ExitStack() as stack:
                if i < accum - 1:  # DDP all-reduces only on the last micro-batch of the step
                    for ddp in self._ddp:
                        stack.enter_context(ddp.no_sync())
                if self.fsdp and accum > 1:  # likewise FSDP's reduce-scatter
                    set_gradient_sync(self.task, i == accum - 1)
                with self._autocast():
                    out = self.model(_to_device(batch, self.device))
                if "loss" not in out:
                    raise KeyError(f"the task returned {sorted(out)}; it must return a 'loss'")
                self.scaler.scale(out["loss"] / accum).backward()
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float().reshape(())
        sync_replicated_grads(self.fsdp_whole_params)
        keys = sorted(sums)
        values = all_reduce_mean(torch.stack([sums[k] for k in keys]) / accum)  # one collective per step
        return dict(zip(keys, values.tolist()))

    def _agree_on_inf(self) -> None:
        """fp16 on several ranks: if any rank's sharded gradients overflowed, every rank skips the step.

        Replicated gradients are identical after DDP's all-reduce, but the centres' gradients are
        per rank; without this a rank could skip a step that the others take.
        """
        if not (self.scaler.is_enabled() and self.world_size > 1 and self.sharded_params):
            return
        bad = torch.zeros(1, device=self.device)
        for p in self.sharded_params:
            if p.grad is not None:
                bad += (~torch.isfinite(p.grad)).any().float()
        if all_reduce_max(bad).item() > 0:
            for p in self.sharded_params:
                if p.grad is not None:
                    p.grad.fill_(float("inf"))  # the scaler sees the overflow here too

    def _optimizer_step(self) -> float | None:
        self._agree_on_inf()
        self.scaler.unscale_(self.optimizer)
        norm = None
        if self.clip_grad_norm is not None and self.replicated_params and self.fsdp:
            norm = clip_grad_norm_(self.replicated_params, self.clip_grad_norm)  # sharded and whole together
        elif self.clip_grad_norm is not None and self.replicated_params:
            norm = float(torch.nn.utils.clip_grad_norm_(self.replicated_params, self.clip_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    # -- epochs --------------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[list[Any]]:
        group: list[Any] = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.loop_cfg.grad_accum_steps:
                yield group
                group = []

    def _after_step(self, metrics: dict[str, float], grad_norm: float | None, started: tuple[float, int]) -> None:
        p = self.progress
        after = getattr(self.task, "after_optimizer_step", None)
        if callable(after):
            metrics.update(after(p.step, p.epoch, metrics) or {})
        for hook in self.hooks:
            result = hook.on_step(self, metrics) if hasattr(hook, "on_step") else None
            if result:
                self.logger.log(p.step, result, prefix="eval")
        if p.step % self.loop_cfg.log_every == 0 or p.step == self.total_steps:
            elapsed = max(time.perf_counter() - started[0], 1e-9)
            record = {**metrics, "lr": self.scheduler.get_last_lr()[0], "epoch": p.epoch,
                      "samples_per_s": (p.step - started[1]) * self.samples_per_step / elapsed}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if self.scaler.is_enabled():
                record["grad_scale"] = float(self.scaler.get_scale())
            self.logger.log(p.step, record)
        self.logger.set_progress(p.step)
        every = self.ckpt_cfg.every_steps
        if every and p.step % every == 0:
            self.save_checkpoint()

    def fit(self) -> Progress:
        """Train until the schedule (or `loop.stop_at_step`) ends; returns the final progress."""
        seed_everything(self.loop_cfg.seed + self.rank)
        self._maybe_resume()
        p = self.progress
        stop_at = min(self.total_steps, self.loop_cfg.stop_at_step or self.total_steps)
        started = (time.perf_counter(), p.step)
        self.task.train()
        try:
            while p.step < stop_at:
                self.sampler.set_position(p.epoch, p.samples_in_epoch)
                for micro_batches in self._micro_batches():
                    metrics = self._forward_backward(micro_batches)
                    if not math.isfinite(metrics["loss"]):
                        last = self.checkpoints.latest()
                        raise NonFiniteLossError(
                            f"loss is {metrics['loss']} at step {p.step + 1} (epoch {p.epoch}); stopped before the "
                            f"update. Last good checkpoint: {last or 'none yet'}. Try a lower optim.lr, a longer "
                            "warm-up, loop.precision=bf16 or a smaller clip_grad_norm."
                        )
                    grad_norm = self._optimizer_step()
                    p.step += 1
                    p.samples_in_epoch += self.samples_per_step
                    self._after_step(metrics, grad_norm, started)
                    if p.step >= stop_at:
                        break
                else:  # the epoch ran out
                    p.epoch += 1
                    p.samples_in_epoch = 0
                    if self.ckpt_cfg.at_epoch_end and self.last_saved_step != p.step:
                        self.save_checkpoint()
            if self.last_saved_step != p.step:
                self.save_checkpoint()
            if p.step >= self.total_steps:
                for hook in self.hooks:
                    result = hook.on_end(self) if hasattr(hook, "on_end") else None
                    if result:
                        self.logger.log(p.step, result, prefix="eval")
        finally:
            self.logger.close()
        return p

    def close(self) -> None:
        """Release the DDP wrapper (before `destroy_process_group`, avoiding a gloo abort at exit)."""
        self.logger.close()
        if self._ddp and self.model is self.task:
            self.task.set_data_parallel(None)
        self._ddp = []
        self.model = None
        self.loader = None
        gc.collect()


__all__ = [
    "Hook",
    "NonFiniteLossError",
    "Progress",
    "RunLogger",
    "Trainer",
    "WarmupPolyDecay",
    "adamw_param_groups",
    "build_adamw",
    "seed_everything",
]
