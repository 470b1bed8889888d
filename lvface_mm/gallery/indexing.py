"""Photo indexing as a sharded, resumable job.

    find_images -> plan_shards -> runner (inline | local processes | torchrun ranks | Ray Data)
        each shard: sha256 -> known? -> decode -> detect + align + embed (+ CLIP) in batches
                    -> shard-NNNNN-<fp>.parquet (atomic)
    -> merge every shard into the collection database (PhotoIndex, one transaction per shard)

This module holds what a worker runs (`EncoderSpec`, `ShardTask`) and the merge; the engines are in
`runners.py` and the job that plans shards and calls an engine is `index_job.run_index_job`.

The database stays the source of truth for `lvface-mm search` and the demo; the shards are the
workers' output and a record of what each file held (boxes, landmarks, embeddings, errors).

Resumable and idempotent: a shard whose file exists is not redone; a killed worker leaves no file,
so its shard is redone whole; merging keeps one row per content hash and records merged shards, so
rerunning a job or a merge never duplicates a photo. Workers skip content hashes the database
already holds (when they can read it) without decoding them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..models.pretrained import sha256_of
from .photos import IndexReport, PhotoIndex
from .shards import PhotoRecord, Shard, ShardError, read_shard, read_shard_meta, write_shard

if TYPE_CHECKING:
    from ..faces.embedder import FaceEmbedder
    from .clip import ClipEncoder

__all__ = [
    "EncoderSpec",
    "Encoders",
    "IndexJobConfig",
    "JobReport",
    "ShardOutcome",
    "ShardTask",
    "build_collection",
    "index_paths",
]


class Encoders(NamedTuple):
    embedder: FaceEmbedder
    clip: ClipEncoder | None


@dataclass(frozen=True)
class EncoderSpec:
    """How each worker builds its encoders: picklable, so every process (or Ray actor) builds its own.

    Attributes:
        face_model: registered LVFace name; ``tiny_seed`` set: ``lvface_tiny`` with random weights (tests).
        random_seed: random weights for ``face_model`` from this seed (benchmarks), not the official ones.
        checkpoint: local checkpoint instead of the official weights.
        detector, detector_weights: detector name and, for the ONNX detectors, its file.
        device: torch device ("cuda" under torchrun means this rank's local GPU); None: CUDA if available.
        backend, dtype, flip_test, batch_size, min_face_size, max_faces, max_image_pixels,
            min_detection_score, landmark_check: see ``FaceEmbedder``.
        clip_model, clip_pretrained: open_clip architecture and weights; ``clip_model=None``: faces only.
        tiny_clip_seed: a tiny random CLIP instead (tests).
    """

    face_model: str = "lvface_b"
    checkpoint: str | None = None
    tiny_seed: int | None = None
    random_seed: int | None = None
    detector: str = "dlib"
    detector_weights: str | None = None
    device: str | None = None
    backend: str = "auto"
    dtype: str | None = None
    flip_test: bool = False
    batch_size: int = 64
    min_face_size: float = 20.0
    max_faces: int | None = None
    max_image_pixels: int | None = None
    min_detection_score: float | None = None
    landmark_check: bool = True
    clip_model: str | None = "ViT-B-32"
    clip_pretrained: str | None = "laion2b_s34b_b79k"
    tiny_clip_seed: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "torch", "onnx"):
            raise ValueError(f"EncoderSpec.backend={self.backend!r}: expected 'auto', 'torch' or 'onnx'")
        if self.tiny_seed is not None and (self.checkpoint or self.backend == "onnx"):
            raise ValueError("EncoderSpec: tiny_seed means random PyTorch weights; it excludes checkpoint and onnx")
        if self.tiny_seed is not None and self.random_seed is not None:
            raise ValueError("EncoderSpec: give tiny_seed or random_seed, not both")
        if self.detector_weights and self.detector not in ("scrfd", "retinaface"):
            raise ValueError(f"detector_weights is for the ONNX detectors (scrfd, retinaface), not {self.detector!r}")

    @property
    def face_key(self) -> str:
        """The face embedding space, stored with the index."""
        return "lvface_tiny" if self.tiny_seed is not None else self.face_model

    @property
    def clip_key(self) -> str | None:
        """The CLIP embedding space, or None for a face-only job."""
        if self.tiny_clip_seed is not None:
            return f"tiny-random-{self.tiny_clip_seed}-64"
        if self.clip_model is None:
            return None
        from .clip import ClipConfig

        return ClipConfig(self.clip_model, self.clip_pretrained).key

    def build(self) -> Encoders:
        from ..faces import FaceEmbedder

        common: dict[str, Any] = dict(
            detector=self.detector, device=self.device, dtype=self.dtype, flip_test=self.flip_test,
            batch_size=self.batch_size, min_face_size=self.min_face_size, max_faces=self.max_faces,
            detector_kwargs={"model_path": self.detector_weights} if self.detector_weights else None,
            min_detection_score=self.min_detection_score, landmark_check=self.landmark_check)
        if self.max_image_pixels is not None:
            common["max_image_pixels"] = self.max_image_pixels
        if self.tiny_seed is not None:
            embedder = FaceEmbedder.from_tiny(seed=self.tiny_seed, backend=self.backend, **common)
        elif self.random_seed is not None:
            import torch

            from ..models import create_model

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.random_seed)
                model = create_model(self.face_model)
            embedder = FaceEmbedder(model, backend=self.backend, **common)
        else:
            embedder = FaceEmbedder(self.face_model, checkpoint_path=self.checkpoint, backend=self.backend, **common)
        embedder.detector  # noqa: B018 - build it now: a missing extra fails before any photo, and not mid-shard
        clip = None
        if self.tiny_clip_seed is not None:
            from .clip import ClipEncoder

            clip = ClipEncoder.tiny(seed=self.tiny_clip_seed)
        elif self.clip_model is not None:
            from .clip import ClipConfig, ClipEncoder

            clip = ClipEncoder.from_pretrained(ClipConfig(self.clip_model, self.clip_pretrained),
                                               device=self.device or ("cuda" if _cuda() else "cpu"))
        return Encoders(embedder, clip)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class IndexJobConfig:
    """Knobs of a job. ``shard_dir`` holds the Parquet shards (shared storage when the workers run on
    several machines); ``db`` is the collection database the shards are merged into."""

    db: str
    shard_dir: str
    shard_size: int = 256
    photo_batch: int = 8
    retry_failed: bool = False

    def __post_init__(self) -> None:
        for name in ("shard_size", "photo_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"IndexJobConfig.{name}={value!r}: expected a positive integer")


@dataclass(frozen=True)
class ShardOutcome:
    """What a worker did with one shard: counts by status, or the error that stopped the shard."""

    name: str
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    started_at: float = 0.0  # time.time() around the shard's indexing: spans of several workers compare
    finished_at: float = 0.0
    error: str | None = None
    done_before: bool = False  # the shard file already existed: nothing was redone


class ShardTask:
    """Index one shard: a picklable callable that builds its encoders on first use in each process.

    ``stop_after`` (tests, benchmarks) makes the worker stop, without writing, after that many photos
    of a shard, as a killed worker would.
    """

    def __init__(self, config: IndexJobConfig, spec: EncoderSpec, *, stop_after: int | None = None) -> None:
        self.config, self.spec, self.stop_after = config, spec, stop_after
        self._encoders: Encoders | None = None
        self._db: PhotoIndex | None = None

    def __getstate__(self) -> dict[str, Any]:  # ship the recipe, never the built models
        return {"config": self.config, "spec": self.spec, "stop_after": self.stop_after}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"], state["spec"], stop_after=state["stop_after"])

    @property
    def encoders(self) -> Encoders:
        if self._encoders is None:
            self._encoders = self.spec.build()
        return self._encoders

    def _known(self) -> Callable[[str, str], tuple[str, str | None] | None]:
        """Look-up of content already in the database; nothing is known when the database is not reachable."""
        if self._db is None and Path(self.config.db).exists():
            try:
                self._db = PhotoIndex(self.config.db)
            except ValueError:
                self._db = None
        if self._db is None:
            return lambda sha, path: None
        db, retry = self._db, self.config.retry_failed

        def known(sha: str, path: str) -> tuple[str, str | None] | None:
            try:
                found = db.known(sha, path)
            except sqlite3.Error:
                return None
            return None if retry and found is not None and found[0] == "failed_before" else found

        return known

    def __call__(self, shard: Shard) -> ShardOutcome:
        target = shard.file(self.config.shard_dir)
        if target.exists():
            return ShardOutcome(shard.name, done_before=True)
        encoders = self.encoders  # built once per process, outside the shard's timings
        start, cpu, started_at = time.perf_counter(), time.process_time(), time.time()
        records = index_paths(shard.paths, encoders, known=self._known(), photo_batch=self.config.photo_batch,
                              stop_after=self.stop_after)
        outcome = dict(name=shard.name, rows=len(records), seconds=time.perf_counter() - start,
                       cpu_seconds=time.process_time() - cpu, started_at=started_at, finished_at=time.time())
        if len(records) < len(shard.paths):
            return ShardOutcome(**outcome, error="stopped before the end of the shard (nothing written)")
        counts: dict[str, int] = {}
        for r in records:
            counts[r.status] = counts.get(r.status, 0) + 1
        try:
            write_shard(target, records, {"shard": shard.name, "face_model": self.spec.face_key,
                                          "clip": self.spec.clip_key})
        except ShardError as exc:
            return ShardOutcome(**outcome, counts=counts, error=str(exc))
        return ShardOutcome(**outcome, counts=counts)


def index_paths(paths: Sequence[str], encoders: Encoders, *, known: Callable[[str, str], Any] | None = None,
                photo_batch: int = 8, stop_after: int | None = None) -> list[PhotoRecord]:
    """One PhotoRecord per path, in order: hashed, checked against ``known``, decoded, embedded in batches."""
    from ..faces.image_io import ImageLoadError, load_image

    embedder, clip = encoders
    records: list[PhotoRecord | None] = [None] * len(paths)
    pending: list[tuple[int, str, Any]] = []  # (position, sha256, LoadedImage)
    for i, path in enumerate(paths):
        if stop_after is not None and i >= stop_after:
            return [r for r in records if r is not None]
        try:
            sha = sha256_of(path)
        except OSError as exc:
            records[i] = PhotoRecord(path, None, "failed", f"cannot read file ({exc.strerror or exc})")
            continue
        found = known(sha, path) if known is not None else None
        if found is not None:
            records[i] = PhotoRecord(path, sha, found[0], found[1])
            continue
        try:
            loaded = load_image(path, max_pixels=embedder.config.max_image_pixels)
        except ImageLoadError as exc:
            records[i] = PhotoRecord(path, sha, "failed", exc.reason)
            continue
        pending.append((i, sha, loaded))
        if len(pending) >= photo_batch:
            _embed_batch(pending, encoders, paths, records)
            pending = []
    if pending:
        _embed_batch(pending, encoders, paths, records)
    return records  # type: ignore[return-value] - every slot is filled


def _embed_batch(batch: list[tuple[int, str, Any]], encoders: Encoders, paths: Sequence[str],
                 records: list[PhotoRecord | None]) -> None:
    embedder, clip = encoders
    arrays = [loaded.array for _, _, loaded in batch]
    try:
        results = embedder.embed(arrays, assume_aligned=False)
        clips = clip.encode_images(arrays) if clip is not None else [None] * len(arrays)
    except (ValueError, RuntimeError) as exc:  # one bad image spoils the batch: redo one by one
        if len(batch) == 1:
            i, sha, _ = batch[0]
            records[i] = PhotoRecord(paths[i], sha, "failed", f"{type(exc).__name__}: {exc}")
            return
        for item in batch:
            _embed_batch([item], encoders, paths, records)
        return
    for (i, sha, loaded), result, vector in zip(batch, results, clips):
        if result.error is not None:
            records[i] = PhotoRecord(paths[i], sha, "failed", result.error)
            continue
        back = 1.0 / loaded.scale  # boxes in original pixels even when a huge JPEG was decoded reduced
        faces = result.faces
        width, height = loaded.original_size
        records[i] = PhotoRecord(
            paths[i], sha, "indexed", None, int(width), int(height),
            boxes=np.array([f.box for f in faces], np.float32).reshape(-1, 4) * back,
            scores=np.array([f.score for f in faces], np.float32),
            landmarks=np.array([f.landmarks for f in faces], np.float32).reshape(-1, 5, 2) * back,
            embeddings=np.stack([f.embedding for f in faces]).astype(np.float32) if faces
            else np.zeros((0, 0), np.float32),
            clip=None if vector is None else np.asarray(vector, np.float32))


@dataclass
class JobReport(IndexReport):
    """An IndexReport plus what happened to the shards."""

    shards: int = 0
    shards_done_before: int = 0
    shard_errors: list[tuple[str, str]] = field(default_factory=list)  # (shard file or name, reason)
    worker_cpu_seconds: float = 0.0
    indexing_span: float = 0.0  # first shard's start to last shard's end, this run (worker start-up excluded)
    merged: bool = True  # False on torchrun ranks other than 0, which leave the merge to rank 0


def build_collection(index: PhotoIndex, shard_files: Iterable[str | Path], report: IndexReport | None = None
                     ) -> IndexReport:
    """Merge shard files into ``index`` in the given order, each once. A shard that cannot be read is
    listed in ``report.shard_errors`` (JobReport) or raised (plain IndexReport) and merged on a later
    run; what is already in the database is never touched by a bad shard."""
    report = report if report is not None else IndexReport()
    merged = index.merged_shards()
    for file in map(Path, shard_files):
        name = file.name.removesuffix(".parquet")
        try:
            if name in merged:  # count its rows as skipped without reading the embeddings
                _count_merged(file, report)
                continue
            records, meta = read_shard(file)
            _check_spaces(index, file, meta)
        except ShardError as exc:
            if not isinstance(report, JobReport):
                raise
            report.shard_errors.append((str(file), exc.reason))
            continue
        index.merge_records(records, name, report)
    return report


def _check_spaces(index: PhotoIndex, file: Path, meta: dict[str, Any]) -> None:
    stored = index.stats()
    for key in ("face_model", "clip"):
        if meta.get(key) is not None and stored.get(key) not in (None, meta[key]):
            raise ShardError(file, f"made with {key} {meta[key]!r}, but {index.path} holds {stored[key]!r}")


def _count_merged(file: Path, report: IndexReport) -> None:
    import pyarrow.parquet as pq

    read_shard_meta(file)
    try:
        table = pq.read_table(file, columns=["path", "status", "error"])
    except (OSError, ValueError) as exc:
        raise ShardError(file, f"corrupt Parquet data ({exc})") from exc
    for path, status, error in zip(*(table.column(c).to_pylist() for c in ("path", "status", "error"))):
        if status in ("indexed", "known"):
            report.skipped += 1
        else:
            report.failed_before.append((path, error or "unknown error"))
