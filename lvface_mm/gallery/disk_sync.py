"""Keep an on-disk index (``disk_index.py``) in step with its sources of vectors.

- ``GalleryIndex``: follows a gallery's SQLite file (the source of truth). Opening it memory-maps
  the index and catches up only what changed since the last sync: ids gone from the database are
  deleted, ids the index lacks and rows updated since the saved watermark are (re)added. A missing,
  foreign or damaged index is reported (a warning naming the file) and rebuilt from the database;
  a damaged one is moved aside first, never overwritten.
- ``PhotoFaceIndex``: follows the ``photo_faces`` table of a photo collection (``photos.py``): face
  rows are only ever inserted (with new ids) or deleted, so catching up is "ids past the watermark".
- ``PhotoClipIndex``: the same for the CLIP embeddings of its ``photos`` (text search).
- ``default_index_path``: where these live unless told otherwise: beside the database file.
- ``read_parquet_vectors``: (ids, vectors) batches from Parquet files with a column of embeddings,
  for ``DiskIndex.build`` over photo-collection shards.

One process owns an index folder at a time (an index is not safe for two writers): opening one takes
an exclusive lock on ``<folder>.lock`` and raises ``IndexInUseError`` when another holder has it,
so callers can fall back to an in-memory index instead of waiting.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .calibration import default_threshold
from .disk_index import MANIFEST, DiskIndex, DiskIndexConfig, IndexFileError
from .identification import Identification, best_or_unknown

__all__ = [
    "GalleryIndex",
    "IndexInUseError",
    "IndexRebuiltWarning",
    "PhotoClipIndex",
    "PhotoFaceIndex",
    "SyncReport",
    "default_index_path",
    "disk_index_config",
    "read_parquet_vectors",
    "resolve_index_path",
]

_log = logging.getLogger(__name__)
_UID_KEY = "disk_index_uid"  # a random id written once into the gallery's meta table
_SQL_CHUNK = 500  # ids per "IN (...)" query, below SQLite's variable limit
CLIP_FLAT_BELOW = 1_000_000  # photos searched exactly by the CLIP index (PhotoClipIndex.default_config)


class IndexRebuiltWarning(UserWarning):
    """The on-disk index could not be used as it was and was rebuilt from the gallery."""


class IndexInUseError(RuntimeError):
    """Another process (or another open object) holds the index folder."""


def default_index_path(database: str | Path, what: str) -> Path:
    """Where the index of ``what`` ("faces": photo faces, "clip": photos' CLIP embeddings, "people":
    gallery templates) of a database file lives by default: ``<database>.<what>.idx/``, beside it.
    Gallery and photo tables may share one file, so each kind gets its own folder."""
    database = Path(database)
    return database.with_name(f"{database.name}.{what}.idx")


def resolve_index_path(database: str, disk_index: bool | str | Path | None, memory_kind: str,
                       what: str) -> Path | None:
    """Where ``PhotoIndex`` / ``Gallery`` keep their on-disk index, from their ``disk_index`` argument:
    ``None`` (default) -> ``default_index_path`` unless ``memory_kind`` (their in-memory ``IndexConfig``
    kind) names a backend other than "auto"; ``True`` -> ``default_index_path``; a path -> that folder;
    ``False`` or an in-memory database -> None (search an in-memory index built at start)."""
    if disk_index is False or database == ":memory:" or database.startswith("file:"):
        return None
    if disk_index is None and memory_kind != "auto":  # an in-memory backend was asked for by name
        return None
    if disk_index is None or disk_index is True:
        return default_index_path(database, what)
    return Path(disk_index)


def disk_index_config() -> DiskIndexConfig:
    """The configuration ``PhotoIndex`` and ``Gallery`` give their on-disk indexes: the default, or
    flat only (exact, no FAISS needed, slower past ~100k vectors) when FAISS is not installed."""
    from .index import faiss_available

    return DiskIndexConfig() if faiss_available() else DiskIndexConfig(kind="flat")


class _FolderLock:
    """Exclusive, non-blocking advisory lock on ``<index>.lock`` (released by ``release`` or at exit)."""

    def __init__(self, index_path: Path) -> None:
        self.path = index_path.with_name(index_path.name + ".lock")
        try:
            import fcntl
        except ImportError as exc:  # no POSIX locks (Windows): do not risk two writers
            raise IndexInUseError(f"{index_path}: no file locking on this platform") from exc
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            raise IndexInUseError(f"{index_path}: in use by another process or object ({self.path} is locked)") \
                from exc

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = -1


@dataclass(frozen=True)
class SyncReport:
    """What one sync did. ``rebuilt`` is True when the index was built from scratch, with why."""

    added: int
    removed: int
    rebuilt: bool
    reason: str = ""
    seconds: float = 0.0


class _SyncedIndex(ABC):
    """An on-disk index that follows a table of an SQLite file: open (memory-map), catch up, or rebuild.

    Subclasses say which table (``_identity``: dimension and a uid that tells this database's index
    from another's) and how to catch up (``_sync``). Reads the database with its own connection; any
    process may write it meanwhile: ``_maybe_sync`` before a search catches up when the file changed
    (SQLite's ``data_version``).
    """

    what = "database"  # how errors name the source

    def __init__(self, index_path: str | Path, database_path: str | Path,
                 config: DiskIndexConfig | None = None) -> None:
        self.index_path = Path(index_path)
        self.database_path = Path(database_path)
        self.config = config
        self._lock = threading.RLock()  # one sync or search at a time: the index is not thread-safe
        if not self.database_path.is_file():
            raise FileNotFoundError(f"{self.what} {self.database_path}: no such file")
        try:
            self._conn = sqlite3.connect(str(self.database_path), isolation_level=None,
                                         check_same_thread=False, timeout=30.0)
            self._dim, self._uid = self._identity()
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{self.what} {self.database_path}: not a readable {self.what} database ({exc})") from exc
        self._data_version = -1
        try:
            self._folder_lock = _FolderLock(self.index_path)
        except BaseException:
            self._conn.close()
            raise
        try:
            self.index, self.last_sync = self._open_or_rebuild()
        except BaseException:
            self._folder_lock.release()
            self._conn.close()
            raise

    @abstractmethod
    def _identity(self) -> tuple[int, str]:
        """(dimension, uid) of the source; may write the uid into the database the first time."""

    @abstractmethod
    def _sync(self, index: DiskIndex) -> SyncReport:
        """Apply the source's changes since ``index.source`` was saved."""

    def _uid_from(self, table: str, key: str = _UID_KEY) -> str:
        """A random id kept in ``table`` (key, value) under ``key``, written once."""
        found = self._conn.execute(f"SELECT value FROM {table} WHERE key = ?", (key,)).fetchone()
        self._first_index = found is None  # no index was ever built from this database
        if found is None:
            self._conn.execute(f"INSERT OR IGNORE INTO {table} VALUES (?, ?)", (key, uuid.uuid4().hex))
            found = self._conn.execute(f"SELECT value FROM {table} WHERE key = ?", (key,)).fetchone()
        return str(found[0])

    # ---------------------------------------------------------------- open / rebuild
    def _open_or_rebuild(self) -> tuple[DiskIndex, SyncReport]:
        start = time.perf_counter()
        problem = None
        try:
            index = DiskIndex.open(self.index_path, self.config)
        except IndexFileError as exc:
            if self.index_path.exists() and not self._looks_like_ours():
                raise IndexFileError(self.index_path, f"{exc}; the folder holds files that are not an lvface-mm "
                                                      "index, so nothing was written there: pass another path") from exc
            problem = str(exc)
            index = None
        if index is not None:
            source = index.source
            if index.dim != self._dim or source.get("gallery_uid") != self._uid:
                problem = (f"{self.index_path / MANIFEST}: index of another {self.what} (uid "
                           f"{source.get('gallery_uid')!r}, {index.dim}-d), not of {self.database_path}")
                index = None
        if index is None:
            return self._rebuild(problem or "", start)
        report = self.sync(index)
        return index, report

    def _looks_like_ours(self) -> bool:
        """A folder with our manifest or our row files: safe to move aside; anything else is left alone."""
        if not self.index_path.is_dir():
            return False
        names = [p.name for p in self.index_path.iterdir()]
        return not names or any(n == MANIFEST or n.startswith(("vectors.", "ids.", "coarse.")) for n in names)

    def _rebuild(self, problem: str, start: float) -> tuple[DiskIndex, SyncReport]:
        existed = self.index_path.exists()
        if existed:
            stem = f"{self.index_path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}"
            aside = self.index_path.with_name(stem)
            n = 0
            while aside.exists():  # two rebuilds in one second: never overwrite the earlier copy
                n += 1
                aside = self.index_path.with_name(f"{stem}-{n}")
            self.index_path.rename(aside)
            problem += f"; the old folder was moved to {aside}"
        if self._first_index and not existed:  # the first build: expected, nothing to warn about
            _log.info("building %s from %s (first use)", self.index_path, self.database_path)
        else:
            warnings.warn(f"{problem}; rebuilding the index from {self.database_path}", IndexRebuiltWarning,
                          stacklevel=4)
        building = self.index_path.with_name(self.index_path.name + ".building")
        if building.exists():
            shutil.rmtree(building)  # our own leftover from a build that was interrupted
        index = DiskIndex.create(building, self._dim, self.config)
        report = self.sync(index)
        index.save()
        building.rename(self.index_path)
        index.path = self.index_path
        report = SyncReport(report.added, report.removed, True, problem, time.perf_counter() - start)
        return index, report

    # ---------------------------------------------------------------- sync
    def sync(self, index: DiskIndex | None = None) -> SyncReport:
        """Apply the database's changes since the last sync to the index; returns what changed."""
        with self._lock:
            return self._sync(self.index if index is None else index)

    def _maybe_sync(self) -> None:
        """Catch up when another connection committed since the last sync (call under the lock)."""
        if int(self._conn.execute("PRAGMA data_version").fetchone()[0]) != self._data_version:
            self.last_sync = self.sync()

    def _decode(self, blobs: Sequence[bytes]) -> np.ndarray:
        bad = [len(b) for b in blobs if len(b) != 4 * self._dim]
        if bad:
            raise ValueError(f"{self.what} {self.database_path}: a vector has {bad[0]} bytes, expected {4 * self._dim}")
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), self._dim).astype(np.float32)

    def _queries(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.asarray(embeddings, np.float32)
        x = x[None] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != self._dim or not np.isfinite(x).all():
            raise ValueError(f"query embeddings: expected finite numbers shaped (N, {self._dim}), got {x.shape}")
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def __len__(self) -> int:
        return len(self.index)

    def close(self) -> None:
        """Save what the index has not saved yet, close the database connection and release the folder."""
        with self._lock:
            if self._conn is None:
                return
            try:
                self.index.close()
            finally:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]
                self._folder_lock.release()

    def __enter__(self) -> _SyncedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GalleryIndex(_SyncedIndex):
    """An on-disk index of a gallery's identity templates that follows the gallery file.

    Example:
        >>> index = GalleryIndex("people.idx", "people.db")     # opens, catches up, or builds
        >>> index.search(query_embeddings, k=5)[0][0].name     # best match of the first query
        >>> index.close()

    Reads the gallery with its own connection; any process may write the gallery meanwhile: a
    search first syncs when the database changed (SQLite's ``data_version``).
    """

    what = "gallery"

    def __init__(self, index_path: str | Path, gallery_path: str | Path,
                 config: DiskIndexConfig | None = None) -> None:
        super().__init__(index_path, gallery_path, config)

    @property
    def gallery_path(self) -> Path:
        return self.database_path

    # ---------------------------------------------------------------- gallery identity
    def _identity(self) -> tuple[int, str]:
        """(feature_dim, uid) of the gallery; the uid tells this gallery's index from another's."""
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"meta", "identities"} <= tables:
            raise ValueError(f"gallery {self.gallery_path}: no identities table; not a gallery made by lvface-mm")
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        # Without it, MAX(updated_at) and "updated since" scan every row with its template blob
        # (3.4 s at 100k identities); with it both are index look-ups and the id list is read from
        # the index too. SQLite keeps it up to date on every write of the gallery.
        self._conn.execute("CREATE INDEX IF NOT EXISTS identities_by_updated_at ON identities(updated_at)")
        return int(meta["feature_dim"]), self._uid_from("meta")

    # ---------------------------------------------------------------- sync
    def _sync(self, index: DiskIndex) -> SyncReport:
        """Catch up from the saved watermark (the newest ``updated_at`` applied, plus the ids written at
        exactly that instant, which are not fetched again).

        Gallery ids are never reused (AUTOINCREMENT) and the index held exactly the gallery's ids after
        the last sync, so once the rows updated since then are applied, the two id sets can differ
        only by deletions, and then their sizes differ: the full id list is read only in that case."""
        start = time.perf_counter()
        state = index.source
        watermark = state.get("watermark")  # None before the first sync
        seen = set(state.get("watermark_ids", []))
        c = self._conn
        c.execute("BEGIN")  # one read snapshot (WAL): counts, id lists and templates agree
        try:
            self._data_version = int(c.execute("PRAGMA data_version").fetchone()[0])
            count = int(c.execute("SELECT COUNT(*) FROM identities").fetchone()[0])
            rows = c.execute("SELECT id, updated_at FROM identities WHERE updated_at >= ?",
                             (-1e300 if watermark is None else watermark,)).fetchall()
            newest = max((t for _, t in rows), default=watermark)
            changed = np.array(sorted(i for i, t in rows if not (t == watermark and i in seen)), np.int64)
            added = removed = 0
            for ids, templates in self._templates(changed, everything=len(changed) > count // 2):
                added += index.add(ids, templates, _save_manifest=False)
            if len(index) != count:
                ids_text = c.execute("SELECT group_concat(id) FROM identities").fetchone()[0]
                db_ids = np.array(ids_text.split(","), np.int64) if ids_text else np.zeros(0, np.int64)
                have = index.ids()
                removed = index.remove(np.setdiff1d(have, db_ids, assume_unique=True), _save_manifest=False)
                missing = np.setdiff1d(db_ids, have, assume_unique=True)  # only after an interrupted sync
                for ids, templates in self._templates(missing, everything=len(missing) > count // 2):
                    added += index.add(ids, templates, _save_manifest=False)
        finally:
            c.execute("COMMIT")
        index.set_source({"gallery": str(self.gallery_path.resolve()), "gallery_uid": self._uid,
                          "watermark": newest, "watermark_ids": sorted(i for i, t in rows if t == newest)})
        if removed:  # a deleted person's codes leave the saved candidate stage now, not at some later save
            index.save()
        return SyncReport(added, removed, False, "", time.perf_counter() - start)

    def _templates(self, wanted: np.ndarray, everything: bool,
                   batch: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, templates) for the ``wanted`` ids, in batches."""
        if len(wanted) == 0:
            return
        if everything:  # one pass over the table beats thousands of IN-queries
            cursor = self._conn.execute("SELECT id, template FROM identities ORDER BY id")
            while rows := cursor.fetchmany(batch):
                ids = np.array([r[0] for r in rows], np.int64)
                keep = np.isin(ids, wanted)
                if keep.any():
                    yield ids[keep], self._decode([r[1] for r, k in zip(rows, keep) if k])
            return
        for lo in range(0, len(wanted), _SQL_CHUNK):
            part = wanted[lo : lo + _SQL_CHUNK].tolist()
            rows = self._conn.execute(f"SELECT id, template FROM identities WHERE id IN ({','.join('?' * len(part))})",
                                      part).fetchall()
            if rows:
                yield np.array([r[0] for r in rows], np.int64), self._decode([r[1] for r in rows])

    # ---------------------------------------------------------------- search
    def search(self, embeddings: np.ndarray, k: int = 5) -> list[list[Identification]]:
        """Top-``k`` identities per query (names from the gallery), best first, no threshold."""
        x = self._queries(embeddings)
        with self._lock:
            self._maybe_sync()
            scores, ids = self.index.search(x, k)
            found = np.unique(ids[ids >= 0]).tolist()
            names: dict[int, str] = {}
            for lo in range(0, len(found), _SQL_CHUNK):
                part = found[lo : lo + _SQL_CHUNK]
                names.update(self._conn.execute(
                    f"SELECT id, name FROM identities WHERE id IN ({','.join('?' * len(part))})", part).fetchall())
        # An id deleted between the sync and this lookup has no name any more: leave it out.
        return [[Identification(names[int(i)], float(s), int(i)) for s, i in zip(srow, irow) if int(i) in names]
                for srow, irow in zip(scores, ids)]

    @property
    def threshold(self) -> float:
        """The gallery's acceptance threshold: saved in its file, else the default for its model."""
        with self._lock:
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        if "threshold" in meta:
            return float(meta["threshold"])
        return default_threshold(meta.get("model_name")).threshold

    def identify(self, embeddings: np.ndarray, threshold: float | None = None) -> list[Identification]:
        """Best identity per query, or unknown (name None) below ``threshold`` (default: the gallery's)."""
        return best_or_unknown(self.search(embeddings, k=1), self.threshold if threshold is None else float(threshold))

    def __enter__(self) -> GalleryIndex:
        return self


class _AppendOnlyIndex(_SyncedIndex):
    """An on-disk index of one vector column of a photo-collection table (``photos.py``) whose rows
    are only inserted (ids from AUTOINCREMENT, never reused, committed in id order: SQLite has one
    writer at a time) or deleted, never changed. So a sync adds the rows past the saved watermark
    (the highest id applied) and, only when the counts then disagree, reads the id list to drop the
    deleted ones. Subclasses name the table, the column, which rows count (``row_filter``) and the
    ``photo_meta`` key of their uid (one per kind: a faces index is not taken for a CLIP one).
    """

    what = "photo index"
    table = ""
    column = ""
    row_filter = ""  # SQL condition on the rows to index; "" = every row
    uid_key = _UID_KEY
    holds = ""  # how errors name the vectors
    setup_sql = ""  # run once per open (e.g. an index that keeps row_filter queries off the blobs)

    @classmethod
    def _select(cls, what: str, *conditions: str) -> str:
        where = " AND ".join(c for c in (cls.row_filter, *conditions) if c)
        return f"SELECT {what} FROM {cls.table}" + (f" WHERE {where}" if where else "")

    @classmethod
    def default_config(cls) -> DiskIndexConfig:
        """The configuration ``PhotoIndex`` opens this kind of index with."""
        return disk_index_config()

    @classmethod
    def has_rows(cls, conn: sqlite3.Connection) -> bool:
        """Whether the database holds any vector of this kind (no index is made before it does)."""
        return conn.execute(cls._select("1") + " LIMIT 1").fetchone() is not None

    def _identity(self) -> tuple[int, str]:
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"photo_meta", self.table} <= tables:
            raise ValueError(f"photo index {self.database_path}: no {self.table} table; not made by lvface-mm index")
        if self.setup_sql:
            self._conn.execute(self.setup_sql)
        row = self._conn.execute(self._select(f"length({self.column})") + " LIMIT 1").fetchone()
        if row is None:
            raise ValueError(f"photo index {self.database_path}: holds no {self.holds} yet; nothing to index")
        return int(row[0]) // 4, self._uid_from("photo_meta", self.uid_key)

    def _sync(self, index: DiskIndex) -> SyncReport:
        start = time.perf_counter()
        watermark = int(index.source.get("watermark", -1))
        c = self._conn
        added = removed = 0
        c.execute("BEGIN")  # one read snapshot: the count and the rows agree
        try:
            self._data_version = int(c.execute("PRAGMA data_version").fetchone()[0])
            count = int(c.execute(self._select("COUNT(*)")).fetchone()[0])
            newest = int(c.execute(self._select("COALESCE(MAX(id), -1)")).fetchone()[0])
            cursor = c.execute(self._select(f"id, {self.column}", "id > ?") + " ORDER BY id", (watermark,))
            while rows := cursor.fetchmany(8192):
                added += index.add(np.array([r[0] for r in rows], np.int64), self._decode([r[1] for r in rows]),
                                   _save_manifest=False)
            if len(index) != count:  # rows deleted (photos with their faces) since the last sync
                ids_text = c.execute(self._select("group_concat(id)")).fetchone()[0]
                db_ids = np.array(ids_text.split(","), np.int64) if ids_text else np.zeros(0, np.int64)
                removed = index.remove(np.setdiff1d(index.ids(), db_ids, assume_unique=True), _save_manifest=False)
        finally:
            c.execute("COMMIT")
        index.set_source({"photo_index": str(self.database_path.resolve()), "gallery_uid": self._uid,
                          "watermark": max(newest, watermark)})
        return SyncReport(added, removed, False, "", time.perf_counter() - start)

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k), row ids (Q, k)) of the nearest vectors, -inf / -1 padded; catches up first."""
        x = self._queries(embeddings)
        with self._lock:
            self._maybe_sync()
            return self.index.search(x, k)


class PhotoFaceIndex(_AppendOnlyIndex):
    """An on-disk index of a photo collection's faces (``photo_faces`` of a ``PhotoIndex`` file);
    ``search`` returns face ids. Face rows are only inserted or deleted with their photo.

    Example:
        >>> faces = PhotoFaceIndex(default_index_path("library.db", "faces"), "library.db")
        >>> scores, face_ids = faces.search(query_embeddings, k=20)
    """

    table, column, holds = "photo_faces", "embedding", "faces"

    def __enter__(self) -> PhotoFaceIndex:
        return self


class PhotoClipIndex(_AppendOnlyIndex):
    """An on-disk index of a photo collection's CLIP image embeddings (the non-NULL ``clip`` of
    ``photos``) for text search; ``search`` returns photo ids. Photo rows are only inserted (with or
    without CLIP: a faces-only run stores NULL) or deleted; only the moved path is ever updated.

    Example:
        >>> photos = PhotoClipIndex(default_index_path("library.db", "clip"), "library.db")
        >>> scores, photo_ids = photos.search(clip.encode_text(["a dog on a beach"]), k=20)
    """

    table, column, holds = "photos", "clip", "CLIP embeddings"
    row_filter = "clip IS NOT NULL"
    uid_key = "clip_index_uid"
    # Counting, listing and finding the newest photo with CLIP then read this small index, not every
    # photo's 2 KiB embedding; SQLite keeps it up to date on every write.
    setup_sql = "CREATE INDEX IF NOT EXISTS photos_with_clip ON photos(id) WHERE clip IS NOT NULL"

    @classmethod
    def default_config(cls) -> DiskIndexConfig:
        """Exact (the flat stage) up to a million photos, as the in-memory index it replaces: a text
        query's best photos lie close together in CLIP cosine (the top ten often within 0.03), where
        the PQ candidate stage that suits faces (a genuine face stands out) loses ranks. One vector a
        photo keeps that affordable: 2 KiB of memory a 512-d photo (benchmarks/results/clip_index.md)."""
        return replace(disk_index_config(), flat_below=CLIP_FLAT_BELOW)

    def __enter__(self) -> PhotoClipIndex:
        return self


# ----------------------------------------------------------------------------- Parquet shards
def read_parquet_vectors(paths: Iterable[str | Path], column: str = "face_embeddings", id_column: str | None = None,
                         *, faces_per_row: int = 256,
                         batch_rows: int = 16_384) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (ids (N,), vectors (N, dim) float32) from Parquet files, batch by batch.

    ``column`` may hold one vector per row (list or fixed-size list of floats, or raw float32
    bytes) or several (a list of such vectors: the faces of one photo). Ids: ``id_column``'s integer
    value, else the running row number over all files; with several vectors per row, face ``j``
    of row ``r`` gets id ``r * faces_per_row + j``. Null rows (photos whose embedding failed) are skipped.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    offset = 0
    for path in paths:
        path = Path(path)
        try:
            reader = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
        names = reader.schema_arrow.names
        for needed in filter(None, (column, id_column)):
            if needed not in names:
                raise ValueError(f"{path}: no column {needed!r}; columns are {names}")
        for record in reader.iter_batches(batch_size=batch_rows, columns=[c for c in (column, id_column) if c]):
            rows = record.column(column).to_pylist()
            row_ids = (np.asarray(record.column(id_column).to_numpy(zero_copy_only=False), np.int64) if id_column
                       else np.arange(offset, offset + len(rows), dtype=np.int64))
            offset += len(rows)
            ids, vectors = _flatten_vectors(rows, row_ids, faces_per_row, path, column)
            if len(ids):
                yield ids, vectors


def _flatten_vectors(rows: list, row_ids: np.ndarray, faces_per_row: int, path: Path,
                     column: str) -> tuple[np.ndarray, np.ndarray]:
    ids: list[int] = []
    vectors: list[np.ndarray] = []
    for row_id, value in zip(row_ids.tolist(), rows):
        if value is None:
            continue
        if isinstance(value, bytes):
            ids.append(row_id)
            vectors.append(np.frombuffer(value, "<f4"))
        elif value and isinstance(value[0], (list, bytes, type(None))):  # several faces in one row
            if len(value) > faces_per_row:
                raise ValueError(f"{path}: row id {row_id} of {column!r} has {len(value)} vectors, "
                                 f"more than faces_per_row={faces_per_row}")
            for j, face in enumerate(value):
                if face is not None:
                    ids.append(row_id * faces_per_row + j)
                    vectors.append(np.frombuffer(face, "<f4") if isinstance(face, bytes) else np.asarray(face))
        elif value:
            ids.append(row_id)
            vectors.append(np.asarray(value))
    if not vectors:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    dims = {len(v) for v in vectors}
    if len(dims) != 1:
        raise ValueError(f"{path}: column {column!r} holds vectors of different lengths {sorted(dims)}")
    return np.asarray(ids, np.int64), np.stack(vectors).astype(np.float32)
