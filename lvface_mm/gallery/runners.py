"""Where the shards of an indexing job run: a registry of engines with one signature.

    engine(shards, task, *, workers, progress, **options) -> [ShardOutcome] (None on torchrun ranks > 0)

    inline    every shard in this process, one after the other
    local     one spawned process per worker on this machine (default: one per core, one thread each)
    torchrun  rank r of world w takes shards r, r + w, ...; rank 0 gets everyone's outcomes (gloo)
    ray       Ray Data: an actor pool of workers over the shard list, on a local or remote cluster

Every engine calls the same ``ShardTask`` (indexing.py), which writes one Parquet file per shard;
the engines only decide which process runs which shard. Past one machine we use torchrun or Ray
rather than a scheduler of our own.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from typing import Any

from .indexing import ShardOutcome, ShardTask
from .shards import Shard

__all__ = ["get_engine", "list_engines", "register_engine"]

Engine = Callable[..., "list[ShardOutcome] | None"]
_ENGINES: dict[str, Engine] = {}


def register_engine(name: str) -> Callable[[Engine], Engine]:
    def add(fn: Engine) -> Engine:
        if name in _ENGINES:
            raise ValueError(f"indexing engine {name!r} is already registered")
        _ENGINES[name] = fn
        return fn

    return add


def get_engine(name: str) -> Engine:
    if name not in _ENGINES:
        raise ValueError(f"unknown indexing engine {name!r}; expected one of {', '.join(sorted(_ENGINES))}")
    return _ENGINES[name]


def list_engines() -> list[str]:
    return sorted(_ENGINES)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run torch (and the ONNX encoder, which follows torch's setting) on ``n`` threads, then restore."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _done_before(shards: Sequence[Shard], task: ShardTask) -> tuple[list[Shard], list[ShardOutcome]]:
    todo, done = [], []
    for s in shards:
        if s.file(task.config.shard_dir).exists():
            done.append(ShardOutcome(s.name, done_before=True))
        else:
            todo.append(s)
    return todo, done


@register_engine("inline")
def run_inline(shards: Sequence[Shard], task: ShardTask, *, workers: int | None = None,
               progress: Callable[[ShardOutcome], None] | None = None, threads: int | None = None
               ) -> list[ShardOutcome]:
    outcomes = []
    with _threads(threads):
        for shard in shards:
            outcomes.append(task(shard))
            if progress is not None:
                progress(outcomes[-1])
    return outcomes


# -- local processes --------------------------------------------------------------------------------
_WORKER_TASK: ShardTask | None = None


def _init_local_worker(task: ShardTask, threads: int) -> None:
    import cv2
    import torch

    global _WORKER_TASK
    torch.set_num_threads(threads)  # n workers x n threads = the cores; oversubscribing only slows
    cv2.setNumThreads(threads)
    _WORKER_TASK = task


def _run_local_shard(shard: Shard) -> ShardOutcome:
    assert _WORKER_TASK is not None, "worker not initialised"
    return _WORKER_TASK(shard)


@register_engine("local")
def run_local(shards: Sequence[Shard], task: ShardTask, *, workers: int | None = None,
              progress: Callable[[ShardOutcome], None] | None = None, threads: int | None = None
              ) -> list[ShardOutcome]:
    """``workers`` spawned processes (default: one per core) with ``threads`` each (default: cores /
    workers). One worker runs in this process. A worker that dies fails its shards, not the job."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    cores = os.cpu_count() or 1
    workers = workers or cores
    if workers < 1:
        raise ValueError(f"workers={workers!r}: expected a positive integer")
    todo, outcomes = _done_before(shards, task)
    workers = min(workers, len(todo))
    threads = threads or max(1, cores // max(workers, 1))
    if workers <= 1:
        return outcomes + run_inline(todo, task, progress=progress, threads=threads)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_local_worker,
                             initargs=(task, threads)) as pool:
        futures = {pool.submit(_run_local_shard, s): s for s in todo}
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - a dead worker (BrokenProcessPool) or a bug: report, go on
                outcome = ShardOutcome(futures[future].name, error=f"worker failed: {type(exc).__name__}: {exc}")
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)
    return outcomes


# -- torchrun ---------------------------------------------------------------------------------------
@register_engine("torchrun")
def run_torchrun(shards: Sequence[Shard], task: ShardTask, *, workers: int | None = None,
                 progress: Callable[[ShardOutcome], None] | None = None, timeout_hours: float = 72.0
                 ) -> list[ShardOutcome] | None:
    """Run as one rank of ``torchrun --nproc_per_node G --nnodes N ...``: this rank indexes shards
    rank, rank + world, ... on its local GPU (or CPU), then rank 0 collects every rank's outcomes.
    The shard folder must be shared storage on several nodes."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("engine 'torchrun' runs under torchrun (RANK and WORLD_SIZE unset); "
                         "use engine 'local' on one machine")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if task.spec.device in (None, "cuda") and torch.cuda.is_available():
        task = ShardTask(task.config, replace(task.spec, device=f"cuda:{local_rank}"))
    created = False
    if world > 1 and not dist.is_initialized():
        # gloo: the outcomes are small Python objects, and a long shard list must not hit NCCL's watchdog.
        dist.init_process_group("gloo", timeout=timedelta(hours=timeout_hours))
        created = True
    try:
        outcomes = run_inline(list(shards)[rank::world], task, progress=progress)
        if world == 1:
            return outcomes
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, [asdict(o) for o in outcomes])
    finally:
        if created:
            dist.destroy_process_group()
    if rank != 0:
        return None
    return [ShardOutcome(**o) for part in gathered for o in part]


# -- Ray Data ---------------------------------------------------------------------------------------
class _RayShardWorker:
    """One Ray Data actor: builds the encoders once, then indexes the shards of each batch."""

    def __init__(self, task: ShardTask, shards: list[Shard], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.task, self.shards = task, shards

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        outcomes = [self.task(self.shards[int(i)]) for i in batch["shard"]]
        return {"outcome": np.array([json.dumps(asdict(o)) for o in outcomes], dtype=object)}


@register_engine("ray")
def run_ray(shards: Sequence[Shard], task: ShardTask, *, workers: int | None = None,
            progress: Callable[[ShardOutcome], None] | None = None, address: str | None = None,
            gpus_per_worker: float = 0.0, threads: int = 1) -> list[ShardOutcome]:
    """Ray Data over the shard list: ``workers`` actors (default: the cluster's CPUs / ``threads``).
    Connects to ``address`` ("auto", "ray://head:10001", ...) unless Ray is already initialised; with
    neither, starts a local Ray. The shard folder must be reachable from every node."""
    try:
        import ray
    except ImportError as exc:
        raise ValueError("engine 'ray' needs Ray Data: pip install 'lvface-mm[scale]'") from exc
    todo, outcomes = _done_before(shards, task)
    if not todo:
        return outcomes
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
        workers = min(workers, len(todo))
        items = ray.data.from_items([{"shard": i} for i in range(len(todo))], override_num_blocks=len(todo))
        results = items.map_batches(_RayShardWorker, fn_constructor_args=(task, todo, threads), batch_size=1,
                                    concurrency=workers, num_cpus=threads, num_gpus=gpus_per_worker or None)
        for row in results.iter_rows():
            outcomes.append(ShardOutcome(**json.loads(row["outcome"])))
            if progress is not None:
                progress(outcomes[-1])
    finally:
        if started:
            ray.shutdown()
    return outcomes
