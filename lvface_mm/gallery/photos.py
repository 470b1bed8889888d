"""A searchable photo collection: every face embedded, every photo CLIP-embedded, in SQLite.

    index:  file -> sha256 (already indexed? skip) -> decode -> FaceEmbedder (boxes + 512-d
            identity embeddings) + ClipEncoder (one image embedding) -> one transaction per photo
    search: by face photo, by enrolled name (gallery template), by text (CLIP), or combined:
            "Alice at the beach" keeps photos where Alice's face matches above the gallery
            threshold and ranks them by CLIP similarity to "at the beach".

Resumable by construction: a photo is either fully committed (faces + CLIP) or absent, and a
rerun skips every file whose content hash is already there, wherever the file moved. Files that
cannot be read are recorded with the reason and skipped on reruns (``retry_failed`` retries them).
The tables live next to a gallery's in the same file if you like: ``--db library.db`` for both.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..models.pretrained import sha256_of
from .disk_sync import (
    IndexInUseError,
    PhotoClipIndex,
    PhotoFaceIndex,
    SyncReport,
    default_index_path,
    resolve_index_path,
)
from .index import IndexConfig, VectorIndex, create_index

if TYPE_CHECKING:
    from ..faces.embedder import FaceEmbedder
    from .clip import ClipEncoder
    from .shards import PhotoRecord
    from .store import Gallery

__all__ = [
    "IMAGE_EXTENSIONS",
    "IndexProgress",
    "IndexReport",
    "PhotoFace",
    "PhotoHit",
    "PhotoIndex",
    "find_images",
    "split_query",
]

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS photo_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    clip BLOB,
    indexed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS photo_faces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    photo_id INTEGER NOT NULL REFERENCES photos(id) ON DELETE CASCADE,
    x1 REAL NOT NULL, y1 REAL NOT NULL, x2 REAL NOT NULL, y2 REAL NOT NULL,
    score REAL NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS photo_faces_by_photo ON photo_faces(photo_id);
CREATE TABLE IF NOT EXISTS photo_failures (
    path TEXT PRIMARY KEY,
    sha256 TEXT,
    error TEXT NOT NULL,
    failed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS photo_shards (
    name TEXT PRIMARY KEY,
    rows INTEGER NOT NULL,
    merged_at REAL NOT NULL
);
"""

# Words that only join names ("Alice and Bob", "Alice, Bob") and carry nothing for CLIP.
_JOINERS = {"and", "with", "&", ",", "+", "together"}


@dataclass(frozen=True)
class PhotoFace:
    """A face in a result photo: box in original pixels, detector score, and, when a gallery was
    consulted, the name it matched and the cosine to that identity (None: unknown)."""

    box: tuple[float, float, float, float]
    detection_score: float
    name: str | None = None
    similarity: float | None = None


@dataclass(frozen=True)
class PhotoHit:
    photo_id: int
    path: str
    score: float  # what the ranking used: face cosine, CLIP text cosine, or both (see PhotoIndex.search)
    faces: tuple[PhotoFace, ...] = ()


@dataclass(frozen=True)
class IndexProgress:
    done: int
    total: int
    path: str
    status: str  # "indexed", "skipped" (already indexed) or "failed" (now or on an earlier run, not retried)


@dataclass
class IndexReport:
    indexed: int = 0
    skipped: int = 0  # content already in the index (these are the only files a rerun counts as done)
    faces: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), failed on this run
    failed_before: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), recorded earlier, not retried
    seconds: float = 0.0
    stopped: bool = False  # should_stop() asked to stop before the end

    @property
    def photos_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0


def find_images(paths: Iterable[str | Path], recursive: bool = True,
                missing: list[str] | None = None) -> list[Path]:
    """Image files (by extension) under the given files/folders, sorted, without duplicates.

    A path that does not exist raises FileNotFoundError, or, when a ``missing`` list is given, is
    appended to it and skipped (a long indexing run should list a typo, not die on it).
    """
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            for f in sorted(p.glob(pattern)):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    found[f] = None
        elif p.exists():
            found[p] = None  # named explicitly: try it whatever its extension
        elif missing is not None:
            missing.append(str(p))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return list(found)


def split_query(query: str, names: Iterable[str]) -> tuple[list[str], str]:
    """Pull enrolled names out of a free-text query: ("Alice at the beach", [..]) -> (["Alice"], "at the beach").

    Longer names win ("Ann Lee" before "Ann"), matching is case-insensitive on word boundaries, and
    words that only join names ("and", "with", commas) are dropped from the remaining text.
    """
    found: list[str] = []
    rest = query
    for name in sorted(set(names), key=len, reverse=True):
        pattern = re.compile(r"(?<!\w)" + re.escape(name) + r"(?!\w)", re.IGNORECASE)
        if pattern.search(rest):
            found.append(name)
            rest = pattern.sub(" ", rest)
    words = [w for w in re.split(r"\s+", rest.replace(",", " , ")) if w]
    while words and words[0].lower() in _JOINERS:
        words.pop(0)
    while words and words[-1].lower() in _JOINERS:
        words.pop()
    text = " ".join(w for w in words if w != ",") if any(w.lower() not in _JOINERS for w in words) else ""
    order = {n: query.lower().find(n.lower()) for n in found}
    return sorted(found, key=order.__getitem__), text


def _blob(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype="<f4").tobytes()


class _OnDisk:
    """One on-disk index a ``PhotoIndex`` searches (faces or CLIP): opened on first use, none while
    the database holds no vector of its kind. When another process holds the folder, ``path``
    becomes None and the caller searches an in-memory index instead (logged once)."""

    def __init__(self, kind: type[PhotoFaceIndex | PhotoClipIndex], path: Path | None, database: str) -> None:
        self.kind, self.path, self.database = kind, path, database
        self.index: PhotoFaceIndex | PhotoClipIndex | None = None

    def open(self, conn: sqlite3.Connection) -> PhotoFaceIndex | PhotoClipIndex | None:
        if self.index is None and self.path is not None and self.kind.has_rows(conn):
            try:
                self.index = self.kind(self.path, self.database, self.kind.default_config())
            except IndexInUseError as exc:
                _log.warning("%s; searching an in-memory index instead", exc)
                self.path = None
        return self.index

    def sync(self, conn: sqlite3.Connection) -> SyncReport | None:
        """Catch up now; what the open did when it did the work, else what this sync did."""
        fresh = self.index is None
        if self.open(conn) is None:
            return None
        opened = self.index.last_sync
        report = self.index.sync()
        return opened if fresh and (opened.rebuilt or opened.added or opened.removed) else report

    def close(self) -> None:
        if self.index is not None:
            self.index.close()
            self.index = None


class PhotoIndex:
    """Faces and CLIP embeddings of a photo collection in one SQLite file.

    Args:
        path: database file (may be shared with a ``Gallery``).
        embedder: the face pipeline, needed to add photos and to search by face photo.
        clip: the CLIP encoder, for text queries; adding photos without it stores faces only.
        face_model: name of the face encoder (e.g. "lvface_b"); stored with the index, and an
            index built by another encoder is refused, because their embeddings do not compare.
        index: search backend for the face embeddings (see ``index.py``).
        clip_key: the CLIP embedding space to check against (and record) when no ``clip`` is given.
        disk_index: where face search gets its index. ``None`` (default): an on-disk index kept
            beside the file, ``<path>.faces.idx/`` (memory-mapped at start, caught up with the
            faces added or deleted since, rebuilt with an ``IndexRebuiltWarning`` when missing or
            damaged; see ``disk_sync.PhotoFaceIndex``), unless ``index`` names an in-memory backend
            or the database is ``:memory:``. ``True``: that folder; a path: another folder;
            ``False``: an in-memory index built from the file at every start. Text search
            (CLIP) follows the same switch with ``<path>.clip.idx/`` (``disk_sync.PhotoClipIndex``;
            ``<folder>.clip/`` beside a folder given as a path), made only once photos have CLIP
            embeddings.
    """

    def __init__(self, path: str | Path, *, embedder: FaceEmbedder | None = None, clip: ClipEncoder | None = None,
                 face_model: str | None = None, index: IndexConfig | str = "auto", clip_key: str | None = None,
                 disk_index: bool | str | Path | None = None) -> None:
        self.path = str(path)
        self.embedder = embedder
        self.clip = clip
        self._index_config = IndexConfig(kind=index) if isinstance(index, str) else index
        faces = resolve_index_path(self.path, disk_index, self._index_config.kind, "faces")
        clip_path = (None if faces is None else default_index_path(self.path, "clip") if disk_index in (None, True)
                     else faces.with_name(faces.name + ".clip"))
        self._faces_on_disk = _OnDisk(PhotoFaceIndex, faces, self.path)
        self._clip_on_disk = _OnDisk(PhotoClipIndex, clip_path, self.path)
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            with self._transaction() as c:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        c.execute(statement)
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"photo index {self.path}: not a readable database ({exc})") from exc
        self._check_spaces(face_model, clip.key if clip is not None else clip_key)
        self._face_version = self._clip_version = (-1, -1)
        self._face_index: VectorIndex | None = None
        self._clip_index: VectorIndex | None = None

    @property
    def disk_index_path(self) -> Path | None:
        """The on-disk face index folder; None when off (or another process holds it)."""
        return self._faces_on_disk.path

    @property
    def clip_index_path(self) -> Path | None:
        """The on-disk CLIP (text search) index folder; None when off (or another process holds it)."""
        return self._clip_on_disk.path

    # ---------------------------------------------------------------- bookkeeping
    def _transaction(self):  # noqa: ANN202 - a context manager over the connection
        return _Transaction(self._conn, self._lock)

    def _meta(self) -> dict[str, str]:
        with self._lock:
            return dict(self._conn.execute("SELECT key, value FROM photo_meta").fetchall())

    def _check_spaces(self, face_model: str | None, clip_key: str | None) -> None:
        """Refuse to mix embeddings of different encoders in one index."""
        with self._transaction() as c:
            stored = dict(c.execute("SELECT key, value FROM photo_meta").fetchall())
            for key, value, what in (("face_model", face_model, "face encoder"), ("clip", clip_key, "CLIP model")):
                if value is None:
                    continue
                if key not in stored:
                    c.execute("INSERT INTO photo_meta VALUES (?, ?)", (key, value))
                elif stored[key] != value:
                    raise ValueError(f"photo index {self.path} was built with {what} {stored[key]!r}, not {value!r}; "
                                     "use that one, or a new --db file")

    @property
    def face_model(self) -> str | None:
        return self._meta().get("face_model")

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM photos").fetchone()[0])

    @property
    def num_faces(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM photo_faces").fetchone()[0])

    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that could not be indexed."""
        with self._lock:
            return [tuple(r) for r in self._conn.execute("SELECT path, error FROM photo_failures ORDER BY path")]

    def photo_path(self, photo_id: int) -> str:
        with self._lock:
            row = self._conn.execute("SELECT path FROM photos WHERE id = ?", (photo_id,)).fetchone()
        if row is None:
            raise KeyError(f"no photo {photo_id} in {self.path}")
        return row[0]

    # ---------------------------------------------------------------- indexing
    def add(self, paths: Iterable[str | Path], *, batch_size: int = 8, progress: Callable[[IndexProgress], None] | None
            = None, retry_failed: bool = False, should_stop: Callable[[], bool] | None = None) -> IndexReport:
        """Index image files (folders are searched recursively). See the module docstring."""
        if self.embedder is None:
            raise ValueError("PhotoIndex.add needs embedder= (faces); clip= is optional (without it: faces only)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
        missing: list[str] = []
        files = find_images(paths, missing=missing)
        report = IndexReport(failed=[(p, "no such file or folder") for p in missing])
        start = time.perf_counter()
        done = 0
        pending: list[tuple[Path, str, Any]] = []

        def tick(path: Path, status: str) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(IndexProgress(done, len(files), str(path), status))

        for path in files:
            if should_stop is not None and should_stop():
                report.stopped = True
                break
            status, sha, loaded = self._triage(path, retry_failed)
            if status == "todo" and any(sha == queued for _, queued, _ in pending):
                status = "skipped"  # the same bytes twice in one batch: index them once
            if status == "skipped":
                report.skipped += 1
                tick(path, status)
            elif status == "failed":
                report.failed.append((str(path), loaded))
                tick(path, status)
            elif status == "failed_before":
                report.failed_before.append((str(path), loaded))
                tick(path, "failed")
            else:
                pending.append((path, sha, loaded))
            if len(pending) >= batch_size:
                self._index_batch(pending, report, tick)
                pending = []
        if pending:
            self._index_batch(pending, report, tick)
        report.seconds = time.perf_counter() - start
        return report

    def _triage(self, path: Path, retry_failed: bool) -> tuple[str, str | None, Any]:
        """('skipped'|'failed'|'failed_before'|'todo', sha256, LoadedImage or the failure reason)."""
        from ..faces.image_io import ImageLoadError, load_image

        try:
            sha = sha256_of(path)
        except OSError as exc:
            return "failed", None, self._fail(path, None, f"cannot read file ({exc.strerror or exc})")
        with self._lock:
            row = self._conn.execute("SELECT id, path FROM photos WHERE sha256 = ?", (sha,)).fetchone()
            failed = self._conn.execute("SELECT sha256, error FROM photo_failures WHERE path = ?",
                                        (str(path),)).fetchone()
        if row is not None:
            if row[1] != str(path) and not Path(row[1]).exists():  # moved: remember where it is now
                with self._transaction() as c:
                    c.execute("UPDATE photos SET path = ? WHERE id = ?", (str(path), row[0]))
            return "skipped", sha, None
        if failed is not None and failed[0] == sha and not retry_failed:
            return "failed_before", sha, failed[1]  # still broken, and not indexed: never counted as done
        max_pixels = self.embedder.config.max_image_pixels if self.embedder is not None else None
        try:
            loaded = load_image(path, max_pixels=max_pixels) if max_pixels else load_image(path)
        except ImageLoadError as exc:
            return "failed", sha, self._fail(path, sha, exc.reason)
        return "todo", sha, loaded

    def _fail(self, path: Path, sha: str | None, reason: str) -> str:
        with self._transaction() as c:
            c.execute("INSERT OR REPLACE INTO photo_failures VALUES (?, ?, ?, ?)",
                      (str(path), sha, reason, time.time()))
        return reason

    def _index_batch(self, batch: list[tuple[Path, str, Any]], report: IndexReport,
                     tick: Callable[[Path, str], None]) -> None:
        arrays = [loaded.array for _, _, loaded in batch]
        try:
            results = self.embedder.embed(arrays, assume_aligned=False)
            clips = self.clip.encode_images(arrays) if self.clip is not None else [None] * len(arrays)
        except (ValueError, RuntimeError) as exc:  # one bad image spoils the batch: redo one by one
            if len(batch) == 1:
                path, sha, _ = batch[0]
                report.failed.append((str(path), self._fail(path, sha, f"{type(exc).__name__}: {exc}")))
                tick(path, "failed")
                return
            for item in batch:
                self._index_batch([item], report, tick)
            return
        for (path, sha, loaded), result, clip in zip(batch, results, clips):
            if result.error is not None:
                report.failed.append((str(path), self._fail(path, sha, result.error)))
                tick(path, "failed")
                continue
            back = 1.0 / loaded.scale  # boxes in original pixels even when a huge JPEG was decoded reduced
            width, height = loaded.original_size
            with self._transaction() as c:
                # Another process indexing the same collection may have committed these bytes since
                # _triage looked: then this photo is already there, and it counts as skipped.
                cursor = c.execute("INSERT INTO photos (sha256, path, width, height, clip, indexed_at) "
                                   "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(sha256) DO NOTHING",
                                   (sha, str(path), width, height, None if clip is None else _blob(clip), time.time()))
                if cursor.rowcount == 0:
                    report.skipped += 1
                    tick(path, "skipped")
                    continue
                photo_id = cursor.lastrowid
                c.executemany("INSERT INTO photo_faces (photo_id, x1, y1, x2, y2, score, embedding) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)",
                              [(photo_id, *(float(v) * back for v in f.box), float(f.score), _blob(f.embedding))
                               for f in result.faces])
                c.execute("DELETE FROM photo_failures WHERE path = ?", (str(path),))
            report.indexed += 1
            report.faces += len(result.faces)
            tick(path, "indexed")

    # ---------------------------------------------------------------- shards (see indexing.py)
    def merged_shards(self) -> set[str]:
        """Names of the Parquet shards already merged into this index."""
        with self._lock:
            return {r[0] for r in self._conn.execute("SELECT name FROM photo_shards")}

    def merge_records(self, records: Iterable[PhotoRecord], shard: str, report: IndexReport) -> bool:
        """Merge one shard's rows in one transaction; False (nothing done) when ``shard`` was merged before.

        One row per content hash whatever the shards hold: a photo already in the index (from this or
        another shard, or an earlier run) counts as skipped, and a failure of the same file is
        forgotten once it is indexed. The shard's name is recorded in the same transaction, so a crash
        mid-merge leaves the shard unmerged and the rerun merges it exactly once.
        """
        records = list(records)
        with self._transaction() as c:
            if c.execute("SELECT 1 FROM photo_shards WHERE name = ?", (shard,)).fetchone() is not None:
                return False
            now = time.time()
            for r in records:
                if r.status == "failed":
                    report.failed.append((r.path, r.error or "unknown error"))
                    c.execute("INSERT OR REPLACE INTO photo_failures VALUES (?, ?, ?, ?)",
                              (r.path, r.sha256, r.error or "unknown error", now))
                    continue
                if r.status == "failed_before":
                    report.failed_before.append((r.path, r.error or "unknown error"))
                    continue
                inserted = None
                if r.status == "indexed":
                    inserted = c.execute(
                        "INSERT INTO photos (sha256, path, width, height, clip, indexed_at) VALUES (?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT(sha256) DO NOTHING",
                        (r.sha256, r.path, r.width, r.height, None if r.clip is None else _blob(r.clip), now))
                if inserted is not None and inserted.rowcount == 1:
                    c.executemany("INSERT INTO photo_faces (photo_id, x1, y1, x2, y2, score, embedding) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                  [(inserted.lastrowid, *map(float, box), float(score), _blob(emb))
                                   for box, score, emb in zip(r.boxes, r.scores, r.embeddings)])
                    c.execute("DELETE FROM photo_failures WHERE path = ?", (r.path,))
                    report.indexed += 1
                    report.faces += r.num_faces
                    continue
                report.skipped += 1  # "known", or indexed by another shard or run first
                row = c.execute("SELECT id, path FROM photos WHERE sha256 = ?", (r.sha256,)).fetchone()
                if row is not None and row[1] != r.path and not Path(row[1]).exists():  # moved: follow it
                    c.execute("UPDATE photos SET path = ? WHERE id = ?", (r.path, row[0]))
            c.execute("INSERT INTO photo_shards VALUES (?, ?, ?)", (shard, len(records), now))
        return True

    def known(self, sha256: str, path: str) -> tuple[str, str | None] | None:
        """('known', None) when these bytes are indexed, ('failed_before', reason) when this file
        failed with these bytes before, else None (to do)."""
        with self._lock:
            if self._conn.execute("SELECT 1 FROM photos WHERE sha256 = ?", (sha256,)).fetchone() is not None:
                return "known", None
            row = self._conn.execute("SELECT sha256, error FROM photo_failures WHERE path = ?", (path,)).fetchone()
        return ("failed_before", row[1]) if row is not None and row[0] == sha256 else None

    def remove(self, path_or_id: str | Path | int) -> None:
        """Forget one photo (by indexed path or id) and its faces."""
        with self._transaction() as c:
            if isinstance(path_or_id, int):
                n = c.execute("DELETE FROM photos WHERE id = ?", (path_or_id,)).rowcount
            else:
                n = c.execute("DELETE FROM photos WHERE path = ?", (str(path_or_id),)).rowcount
            if n == 0:
                raise KeyError(f"{path_or_id!r} is not in photo index {self.path}")

    # ---------------------------------------------------------------- search caches
    def _version(self) -> tuple[int, int]:
        """Changes when anyone (another connection: data_version; this one: total_changes) wrote the file."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0]), self._conn.total_changes

    def _nearest_photos(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, <=k), photo ids) by CLIP cosine: from the on-disk index when there is one (it
        catches up by itself), else from an in-memory index (re)built when the file changed."""
        with self._lock:
            on_disk = self._clip_on_disk.open(self._conn)
            if on_disk is not None:
                return on_disk.search(queries, k)
            clip_index = self._clip_cache()
            if clip_index is None:
                return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
            return clip_index.search(queries, k)

    def _clip_cache(self) -> VectorIndex | None:
        """The in-memory CLIP index, (re)built when the file changed."""
        with self._lock:
            version = self._version()
            if version != self._clip_version:
                rows = self._conn.execute("SELECT id, clip FROM photos WHERE clip IS NOT NULL ORDER BY id").fetchall()
                self._clip_index, self._clip_version = self._build(rows, 1), version
            return self._clip_index

    def _nearest_faces(self, queries: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, <=limit), face ids) of the nearest faces: from the on-disk index when there is
        one (it catches up by itself), else from an in-memory index (re)built when the file changed."""
        with self._lock:
            on_disk = self._faces_on_disk.open(self._conn)
            if on_disk is not None:
                return on_disk.search(queries, limit)
            version = self._version()
            if version != self._face_version:
                rows = self._conn.execute("SELECT id, embedding FROM photo_faces ORDER BY id").fetchall()
                self._face_index, self._face_version = self._build(rows, 1), version
            if self._face_index is None:
                return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
            return self._face_index.search(queries, min(limit, len(self._face_index)))

    def sync_face_index(self) -> SyncReport | None:
        """Bring the on-disk face index up to date now (``lvface-mm index`` calls this after a merge,
        so the first search does not pay for it); None when there is none (off, or no faces yet)."""
        with self._lock:
            return self._faces_on_disk.sync(self._conn)

    def sync_clip_index(self) -> SyncReport | None:
        """The same for the on-disk CLIP index; None when off or no photo has a CLIP embedding
        (a faces-only collection gets no CLIP index)."""
        with self._lock:
            return self._clip_on_disk.sync(self._conn)

    def _build(self, rows: Sequence[tuple], column: int) -> VectorIndex | None:
        if not rows:
            return None
        vectors = np.stack([np.frombuffer(r[column], "<f4") for r in rows])
        index = create_index(vectors.shape[1], self._index_config)
        index.add(np.array([r[0] for r in rows], np.int64), vectors)
        return index

    def _photos_of(self, face_ids: Sequence[int]) -> dict[int, int]:
        """face id -> photo id (faces deleted meanwhile are left out)."""
        found: dict[int, int] = {}
        with self._lock:
            for lo in range(0, len(face_ids), 500):  # below SQLite's limit of bound variables
                part = list(face_ids[lo : lo + 500])
                found.update(self._conn.execute(
                    f"SELECT id, photo_id FROM photo_faces WHERE id IN ({','.join('?' * len(part))})", part).fetchall())
        return found

    # ---------------------------------------------------------------- queries
    def _face_scores(self, embedding: np.ndarray, limit: int) -> dict[int, tuple[float, int]]:
        """photo_id -> (best face cosine, face id) over the ``limit`` nearest faces."""
        q = np.asarray(embedding, np.float32).reshape(1, -1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        scores, ids = self._nearest_faces(q, limit)
        photo_of = self._photos_of([int(i) for i in ids[0] if i >= 0])
        best: dict[int, tuple[float, int]] = {}
        for s, face_id in zip(scores[0], ids[0]):
            photo = photo_of.get(int(face_id))
            if photo is None:
                continue
            if photo not in best or s > best[photo][0]:
                best[photo] = (float(s), int(face_id))
        return best

    def _hit(self, photo_id: int, score: float, gallery: Gallery | None,
             marked: dict[int, tuple[str | None, float]] | None = None) -> PhotoHit | None:
        """A result with its faces; faces get names from ``marked`` (face id -> name, cosine) or the
        gallery. None when the photo was deleted since it was found."""
        with self._lock:
            row = self._conn.execute("SELECT path FROM photos WHERE id = ?", (photo_id,)).fetchone()
            entries = self._conn.execute("SELECT id, x1, y1, x2, y2, score, embedding FROM photo_faces "
                                         "WHERE photo_id = ? ORDER BY id", (photo_id,)).fetchall()
        if row is None:
            return None
        labels: list[tuple[str | None, float | None]] = [(None, None)] * len(entries)
        if gallery is not None and entries and len(gallery):
            found = gallery.identify(np.stack([np.frombuffer(e[6], "<f4") for e in entries]))
            labels = [(o.name, o.score if o.name is not None else None) for o in found]
        if marked:  # the face that matched the query: its cosine to the query, and a name if any
            labels = [(marked[e[0]][0] or label[0], marked[e[0]][1]) if e[0] in marked else label
                      for e, label in zip(entries, labels)]
        faces = tuple(PhotoFace(tuple(float(v) for v in e[1:5]), float(e[5]), name, sim)
                      for e, (name, sim) in zip(entries, labels))
        return PhotoHit(photo_id, row[0], float(score), faces)

    def _hits(self, found: Iterable[tuple[int, float, dict | None]], gallery: Gallery | None, k: int) -> list[PhotoHit]:
        """Up to ``k`` hits from (photo id, score, marked) in rank order, skipping photos deleted meanwhile."""
        hits: list[PhotoHit] = []
        for photo_id, score, marked in found:
            hit = self._hit(photo_id, score, gallery, marked)
            if hit is not None:
                hits.append(hit)
                if len(hits) == k:
                    break
        return hits

    def search_by_face_embedding(self, embedding: np.ndarray, k: int = 20, *, min_score: float | None = None,
                                 gallery: Gallery | None = None) -> list[PhotoHit]:
        """Photos ranked by their best face's cosine to ``embedding`` (an identity embedding)."""
        best = self._face_scores(embedding, max(200, 20 * k))
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])
        if min_score is not None:
            ranked = [kv for kv in ranked if kv[1][0] >= min_score]
        return self._hits(((p, s, {f: (None, s)}) for p, (s, f) in ranked), gallery, k)

    def search_by_face(self, image: Any, k: int = 20, *, min_score: float | None = None,
                       gallery: Gallery | None = None) -> list[PhotoHit]:
        """Photos showing the person whose face is largest in ``image`` (path, PIL or array)."""
        if self.embedder is None:
            raise ValueError("searching by face photo needs embedder=")
        result = self.embedder.embed_image(image)
        return self.search_by_face_embedding(result.main_face().embedding, k, min_score=min_score, gallery=gallery)

    def search_by_name(self, name: str, gallery: Gallery, k: int = 20) -> list[PhotoHit]:
        """Photos where an enrolled person's face matches above the gallery threshold."""
        return self._named([gallery.get(name).name], "", gallery, k)

    def search_by_text(self, text: str, k: int = 20, *, gallery: Gallery | None = None) -> list[PhotoHit]:
        """Photos ranked by CLIP similarity to ``text``."""
        if self.clip is None:
            raise ValueError("text queries need clip=")
        scores, ids = self._nearest_photos(self.clip.encode_text([text]), k)
        return self._hits(((int(i), float(s), None) for s, i in zip(scores[0], ids[0]) if i >= 0), gallery, k)

    def search(self, query: str, gallery: Gallery | None = None, k: int = 20) -> list[PhotoHit]:
        """Free text with optional enrolled names: "Alice", "Alice and Bob", "Alice at the beach",
        "sunset over water". Names filter (every named person must be in the photo), text ranks."""
        if not query.strip():
            raise ValueError("empty query")
        names, text = split_query(query, [i.name for i in gallery.list_identities()] if gallery else [])
        if not names:
            return self.search_by_text(query, k, gallery=gallery)
        return self._named(names, text, gallery, k)

    def _named(self, names: list[str], text: str, gallery: Gallery, k: int) -> list[PhotoHit]:
        threshold = gallery.threshold
        per_name = []
        for name in names:
            best = self._face_scores(gallery.template(name), 10_000)
            per_name.append({p: v for p, v in best.items() if v[0] >= threshold})
        photos = set.intersection(*(set(d) for d in per_name)) if per_name else set()
        if not photos:
            return []
        face_score = {p: min(d[p][0] for d in per_name) for p in photos}
        marked = {p: {d[p][1]: (n, d[p][0]) for n, d in zip(names, per_name)} for p in photos}
        if text and self.clip is not None and self._has_clip():
            t = self.clip.encode_text([text])[0]
            clip_score = {p: float(self._clip_vector(p) @ t) for p in photos}
            order = sorted(photos, key=lambda p: (-clip_score[p], -face_score[p]))
            return self._hits(((p, clip_score[p], marked[p]) for p in order), gallery, k)
        order = sorted(photos, key=lambda p: -face_score[p])
        return self._hits(((p, face_score[p], marked[p]) for p in order), gallery, k)

    def _has_clip(self) -> bool:
        with self._lock:
            return PhotoClipIndex.has_rows(self._conn)

    def _clip_vector(self, photo_id: int) -> np.ndarray:
        with self._lock:
            blob = self._conn.execute("SELECT clip FROM photos WHERE id = ?", (photo_id,)).fetchone()[0]
        return np.frombuffer(blob, "<f4")

    def stats(self) -> dict[str, Any]:
        meta = self._meta()
        return {"photos": len(self), "faces": self.num_faces, "failures": len(self.failures()),
                "face_model": meta.get("face_model"), "clip": meta.get("clip"), "path": self.path}

    def close(self) -> None:
        with self._lock:
            self._faces_on_disk.close()
            self._clip_on_disk.close()
            self._conn.close()

    def __enter__(self) -> PhotoIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PhotoIndex({json.dumps(self.stats())})"


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the index lock; ROLLBACK on any exception."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock) -> None:
        self._conn, self._lock = conn, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._conn

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        try:
            self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        finally:
            self._lock.release()
