"""The photo-indexing job: plan shards, run them on an engine, merge them into the collection.

    report = run_index_job(["photos/"], IndexJobConfig("lib.db", "lib.db.shards"), EncoderSpec(), engine="local")

What each shard does is `indexing.ShardTask`; the engines (inline, local processes, torchrun ranks,
Ray Data) are `runners.py`. Kept apart from both so the import graph runs one way:
index_job -> runners -> indexing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .indexing import EncoderSpec, IndexJobConfig, JobReport, ShardOutcome, ShardTask, build_collection
from .photos import PhotoIndex, find_images
from .runners import get_engine
from .shards import ShardError, plan_shards, read_shard_meta

__all__ = ["run_index_job"]


def run_index_job(paths: Iterable[str | Path], config: IndexJobConfig, spec: EncoderSpec, *,
                  engine: str = "local", workers: int | None = None, progress: Callable[[ShardOutcome], None]
                  | None = None, disk_index: bool | str | Path | None = None, **engine_options: Any) -> JobReport:
    """Index ``paths`` (files and folders) into ``config.db`` through shards; see the module docstring.

    Args:
        engine: a registered runner (``list_engines()``): "inline", "local", "torchrun", "ray".
        workers: worker count for "local" and "ray" (default: one per CPU core).
        progress: called with each shard's outcome as it finishes.
        disk_index: the on-disk face and CLIP indexes updated after the merge (see ``PhotoIndex``; False: none).
        engine_options: passed to the runner (e.g. ``address=`` for Ray).
    """
    import importlib.util

    runner = get_engine(engine)
    if importlib.util.find_spec("pyarrow") is None:
        raise ValueError("photo indexing writes Parquet shards and needs pyarrow: pip install 'lvface-mm[demo]'")
    missing: list[str] = []
    files = find_images(paths, missing=missing)
    shards = plan_shards(files, config.shard_size)
    Path(config.shard_dir).mkdir(parents=True, exist_ok=True)
    report = JobReport(failed=[(p, "no such file or folder") for p in missing], shards=len(shards))
    # Open the database first: a face model or CLIP other than the one it was built with is refused
    # before any worker starts.
    PhotoIndex(config.db, face_model=spec.face_key, clip_key=spec.clip_key).close()
    for shard in shards:  # a shard file that does not read back is moved aside and redone
        file = shard.file(config.shard_dir)
        if file.exists():
            try:
                read_shard_meta(file)
            except ShardError as exc:
                aside = file.with_name(file.name + ".corrupt")
                with contextlib.suppress(FileNotFoundError):  # another torchrun rank moved it first
                    file.replace(aside)
                report.shard_errors.append((str(file), f"{exc.reason}; moved to {aside.name} and redone"))
    start = time.perf_counter()
    task = ShardTask(config, spec)
    outcomes = runner(shards, task, workers=workers, progress=progress, **engine_options)
    if outcomes is None:  # a non-zero torchrun rank: rank 0 builds the collection
        report.seconds, report.merged = time.perf_counter() - start, False
        return report
    ran = [o for o in outcomes if o.finished_at > 0]
    if ran:
        report.indexing_span = max(o.finished_at for o in ran) - min(o.started_at for o in ran)
    for o in outcomes:
        report.worker_cpu_seconds += o.cpu_seconds
        report.shards_done_before += int(o.done_before)
        if o.error is not None:
            report.shard_errors.append((o.name, o.error))
    with PhotoIndex(config.db, face_model=spec.face_key, clip_key=spec.clip_key, disk_index=disk_index) as index:
        files_done = [s.file(config.shard_dir) for s in shards if s.file(config.shard_dir).exists()]
        build_collection(index, files_done, report)
        # Bring the on-disk indexes (<db>.faces.idx/, and <db>.clip.idx/ when photos have CLIP
        # embeddings) up to date with what was merged, so the first search opens them ready instead
        # of catching up on the whole job.
        index.sync_face_index()
        index.sync_clip_index()
    report.seconds = time.perf_counter() - start
    return report

