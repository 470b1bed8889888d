"""Parquet shards of a photo-indexing job: the plan, the row format, atomic writes and checked reads.

    files (sorted) -> plan_shards(size) -> Shard(index, paths) -> worker -> shard-00012-<fp>.parquet

A shard's file appears only once the whole shard is written (temporary file, fsync, rename), so a
worker killed mid-shard leaves no shard and the rerun redoes exactly that shard: every photo ends up
once. The name carries a fingerprint of the shard's paths, so a shard file is never taken for the
result of a different file list (a collection that gained photos gets new shards; the content hashes
already in the collection database are skipped by the workers without decoding, and the database
keeps one row per content hash whatever the shards say).

One row per input file; faces are nested lists, so pandas, DuckDB or pyarrow read a shard as is:

    path, sha256, status, error, width, height,
    face_boxes [[x1, y1, x2, y2]...], face_scores [...], face_landmarks [[x, y] * 5 ...],
    face_embeddings [[512 floats]...], clip [D floats] or null

status: "indexed" (faces and, unless face-only, CLIP were computed), "known" (content already in the
collection database), "failed" (error says why), "failed_before" (failed on an earlier run with the
same bytes; not retried unless asked).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SHARD_FORMAT",
    "STATUSES",
    "PhotoRecord",
    "Shard",
    "ShardError",
    "plan_shards",
    "read_shard",
    "read_shard_meta",
    "write_shard",
]

SHARD_FORMAT = 1
STATUSES = ("indexed", "known", "failed", "failed_before")
_META_KEY = b"lvface_mm.photo_shard"


class ShardError(RuntimeError):
    """A shard file that cannot be written or read; the message names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"shard {path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class Shard:
    """``paths`` (as strings, in order) make up shard number ``index`` of a job."""

    index: int
    paths: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        return hashlib.sha1("\n".join(self.paths).encode("utf-8", "surrogateescape")).hexdigest()[:10]

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-{self.fingerprint}"

    def file(self, folder: str | Path) -> Path:
        return Path(folder) / f"{self.name}.parquet"


def plan_shards(files: Sequence[str | Path], shard_size: int) -> list[Shard]:
    """Split ``files`` (kept in the given order) into shards of ``shard_size`` paths."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r}: expected a positive integer")
    paths = [str(f) for f in files]
    return [Shard(i, tuple(paths[start:start + shard_size]))
            for i, start in enumerate(range(0, len(paths), shard_size))]


@dataclass(eq=False)  # holds arrays
class PhotoRecord:
    """One input file's row. Arrays: boxes (F, 4), scores (F,), landmarks (F, 5, 2), embeddings (F, D),
    clip (Dc,) or None; all float32, coordinates in original-image pixels."""

    path: str
    sha256: str | None
    status: str
    error: str | None = None
    width: int = 0
    height: int = 0
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5, 2), np.float32))
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    clip: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"{self.path}: status {self.status!r} is not one of {STATUSES}")

    @property
    def num_faces(self) -> int:
        return len(self.scores)


def _nested(pa: Any, rows: list[np.ndarray], width: int) -> Any:
    """list<list<float32>> from per-row (F_i, width) arrays, built from flat buffers (no Python floats)."""
    counts = np.array([len(r) for r in rows], np.int64)
    outer = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)  # (rows + 1,)
    flat = np.concatenate([r.reshape(len(r), width) for r in rows]) if rows else np.zeros((0, width), np.float32)
    inner = (np.arange(len(flat) + 1) * width).astype(np.int32)  # every face has exactly `width` values
    values = pa.array(flat.astype(np.float32, copy=False).reshape(-1), pa.float32())
    return pa.ListArray.from_arrays(pa.array(outer), pa.ListArray.from_arrays(pa.array(inner), values))


def _table(records: Sequence[PhotoRecord], meta: dict[str, Any]) -> Any:
    import pyarrow as pa

    dim = max((r.embeddings.shape[1] for r in records if r.num_faces), default=0)
    for r in records:
        if r.num_faces and r.embeddings.shape != (r.num_faces, dim):
            raise ValueError(f"{r.path}: embeddings of shape {r.embeddings.shape}, expected ({r.num_faces}, {dim})")
    clip_values = [r.clip for r in records]
    clip_dim = max((len(c) for c in clip_values if c is not None), default=0)
    clip_offsets = np.zeros(len(records) + 1, np.int32)
    clip_offsets[1:] = np.cumsum([0 if c is None else len(c) for c in clip_values])
    clip_flat = np.concatenate([c for c in clip_values if c is not None]) if clip_dim else np.zeros(0, np.float32)
    clip = pa.ListArray.from_arrays(pa.array(clip_offsets), pa.array(clip_flat.astype(np.float32), pa.float32()),
                                    mask=pa.array([c is None for c in clip_values], pa.bool_()))
    columns = {
        "path": pa.array([r.path for r in records], pa.string()),
        "sha256": pa.array([r.sha256 for r in records], pa.string()),
        "status": pa.array([r.status for r in records], pa.string()),
        "error": pa.array([r.error for r in records], pa.string()),
        "width": pa.array([r.width for r in records], pa.int32()),
        "height": pa.array([r.height for r in records], pa.int32()),
        "face_boxes": _nested(pa, [r.boxes for r in records], 4),
        "face_scores": pa.ListArray.from_arrays(
            pa.array(np.concatenate([[0], np.cumsum([r.num_faces for r in records])]).astype(np.int32)),
            pa.array(np.concatenate([r.scores for r in records] or [np.zeros(0)]).astype(np.float32))),
        "face_landmarks": _nested(pa, [r.landmarks.reshape(r.num_faces, 10) for r in records], 10),
        "face_embeddings": _nested(pa, [r.embeddings.reshape(r.num_faces, dim) for r in records], dim),
        "clip": clip,
    }
    full_meta = {"format": SHARD_FORMAT, "rows": len(records), "embedding_dim": dim, "clip_dim": clip_dim, **meta}
    return pa.table(columns).replace_schema_metadata({_META_KEY: json.dumps(full_meta).encode()})


def write_shard(path: str | Path, records: Sequence[PhotoRecord], meta: dict[str, Any]) -> None:
    """Write ``records`` to ``path`` atomically: the file is complete or absent. Raises ShardError
    naming the file when it cannot be written (full disk, no permission, missing folder)."""
    import pyarrow.parquet as pq

    path = Path(path)
    table = _table(records, meta)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")  # unique across processes and nodes
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ShardError(path, f"cannot write ({exc.strerror or exc}); nothing of this shard was kept, "
                               "rerun the job to redo it") from exc


def read_shard_meta(path: str | Path) -> dict[str, Any]:
    """The shard's metadata (format, face_model, clip, rows, ...) from the Parquet footer only."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ShardError(path, f"not a readable Parquet file ({exc})") from exc
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ShardError(path, "not an lvface-mm photo shard (no shard metadata)")
    meta = json.loads(raw)
    if meta.get("format") != SHARD_FORMAT:
        raise ShardError(path, f"shard format {meta.get('format')!r}, this version reads {SHARD_FORMAT}")
    return meta


def _unnest(column: Any, width: int, path: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(row offsets (R + 1,), values (N, width)) of a list<list<float32>> column."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = column.offsets.to_numpy()
    inner = column.flatten()
    lengths = inner.value_lengths().to_numpy(zero_copy_only=False) if len(inner) else np.zeros(0, np.int32)
    if len(lengths) and (lengths != width).any():
        raise ShardError(path, f"column {name}: rows of {sorted(set(lengths.tolist()))} values, expected {width}")
    values = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return offsets - offsets[0], values.reshape(-1, width) if width else values.reshape(len(inner), 0)


def read_shard(path: str | Path) -> tuple[list[PhotoRecord], dict[str, Any]]:
    """All rows of a shard and its metadata; raises ShardError naming the file when it is unreadable,
    truncated, of another format or inconsistent."""
    import pyarrow.parquet as pq

    meta = read_shard_meta(path)
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise ShardError(path, f"corrupt Parquet data ({exc})") from exc
    if table.num_rows != meta.get("rows"):
        raise ShardError(path, f"{table.num_rows} rows, the footer promised {meta.get('rows')}")
    try:
        dim, clip_dim = int(meta["embedding_dim"]), int(meta["clip_dim"])
        cols = {name: table.column(name) for name in ("path", "sha256", "status", "error", "width", "height")}
        face_rows, boxes = _unnest(table.column("face_boxes"), 4, path, "face_boxes")
        _, landmarks = _unnest(table.column("face_landmarks"), 10, path, "face_landmarks")
        _, embeddings = _unnest(table.column("face_embeddings"), dim, path, "face_embeddings")
        scores_col = table.column("face_scores").combine_chunks()
        scores = scores_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        clip_col = table.column("clip").combine_chunks()
    except KeyError as exc:
        raise ShardError(path, f"missing column {exc}") from exc
    if not len(boxes) == len(landmarks) == len(embeddings) == len(scores):
        raise ShardError(path, "face columns disagree on the number of faces")
    plain = {name: col.to_pylist() for name, col in cols.items()}
    records = []
    for i in range(table.num_rows):
        a, b = int(face_rows[i]), int(face_rows[i + 1])
        clip = clip_col[i].values.to_numpy(zero_copy_only=False) if clip_col[i].is_valid else None
        if clip is not None and len(clip) != clip_dim:
            raise ShardError(path, f"row {i}: clip of {len(clip)} values, expected {clip_dim}")
        try:
            records.append(PhotoRecord(
                plain["path"][i], plain["sha256"][i], plain["status"][i], plain["error"][i],
                int(plain["width"][i] or 0), int(plain["height"][i] or 0), boxes[a:b], scores[a:b],
                landmarks[a:b].reshape(-1, 5, 2), embeddings[a:b],
                None if clip is None else clip.astype(np.float32, copy=False)))
        except ValueError as exc:
            raise ShardError(path, f"row {i}: {exc}") from exc
    return records, meta
