"""Enrolled identities in one SQLite file: names, embeddings and metadata, and 1:N search.

Durability: WAL journal, ``synchronous=FULL``, one transaction per change, so a process killed
at any moment leaves every committed change readable and none half-written. Privacy: only
embeddings and metadata are stored unless ``store_face_images=True``; ``secure_delete`` zeroes
freed pages and a WAL checkpoint after each delete drops older page copies, so a deleted person's
embeddings do not linger in the file.

Each identity has a *template*: the quality-weighted mean of its enrolment embeddings, L2
normalised. Templates are cached in a vector index (``index.py``) for search; the database is
the source of truth and the cache is reloaded whenever another connection changed the file.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import default_threshold
from .identification import Identification, best_or_unknown
from .index import IndexConfig, VectorIndex, create_index

_log = logging.getLogger(__name__)

__all__ = ["Gallery", "GalleryConfig", "Identification", "Identity", "NameConflictError"]

SCHEMA_VERSION = 1
EXPORT_FORMAT = "lvface-mm-gallery"
MAX_NAME_LENGTH = 128
GALLERY_TABLES = frozenset({"meta", "identities", "samples"})
# Other lvface-mm parts that may share the file (the photo index keeps photos / photo_* tables);
# sqlite_* are SQLite's own. Any other table means the file belongs to another application.
SHARED_TABLE_PREFIXES = ("photo", "sqlite_")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- AUTOINCREMENT: a deleted identity's id is never handed to someone else, so a stale id held by
-- a client can only miss, never point at the wrong person.
CREATE TABLE IF NOT EXISTS identities (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    template BLOB NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    identity_id INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL,
    quality REAL NOT NULL,
    face_image BLOB,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_identity ON samples(identity_id);
"""


class NameConflictError(ValueError):
    """``import_`` found names that are already enrolled (``names``); nothing was imported."""

    def __init__(self, path: str | Path, names: list[str]) -> None:
        super().__init__(f"import {path}: already enrolled: {names}; nothing imported. Pass on_conflict='skip', "
                         "'merge' or 'replace'")
        self.path, self.names = str(path), list(names)


@dataclass(frozen=True)
class Identity:
    """One enrolled person as listed by ``Gallery.list_identities``."""

    identity_id: int
    name: str
    num_samples: int
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True)
class GalleryConfig:
    """How a gallery stores and searches. ``threshold=None`` means: the value saved in the file,
    else the shipped default for ``model_name`` (see ``calibration.DEFAULT_THRESHOLDS``)."""

    feature_dim: int = 512
    threshold: float | None = None
    model_name: str | None = None
    store_face_images: bool = False
    index: IndexConfig = field(default_factory=IndexConfig)
    synchronous: str = "FULL"  # FULL: a commit survives power loss too, not only a killed process
    # Search through an on-disk index beside the file (None: <file>.people.idx/ unless `index` names an
    # in-memory backend; True: that folder; a path; False: in memory). See disk_sync.resolve_index_path.
    disk_index: bool | str | Path | None = None

    def __post_init__(self) -> None:
        if self.feature_dim < 1:
            raise ValueError(f"GalleryConfig.feature_dim={self.feature_dim!r}: expected a positive integer")
        if self.threshold is not None and not (-1.0 <= self.threshold <= 1.0):
            raise ValueError(f"GalleryConfig.threshold={self.threshold!r}: expected a cosine in [-1, 1] or None")
        if self.synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"GalleryConfig.synchronous={self.synchronous!r}: expected FULL, NORMAL or EXTRA")


_BUSY_SECONDS = 30.0  # how long to wait for another process's lock before giving up


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


def _retry_when_busy(step: Any, seconds: float = _BUSY_SECONDS) -> None:
    """Run ``step`` again while SQLite says another connection holds the lock. The busy timeout
    covers most waits, but not all: SQLite returns "database is locked" at once where waiting
    could deadlock (e.g. the exclusive moment of switching to WAL while others open the file)."""
    deadline = time.monotonic() + seconds
    delay = 0.01
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def _has_columns(c: sqlite3.Connection, table: str, *columns: str) -> bool:
    names = {r[1] for r in c.execute(f"PRAGMA table_info({table})")}
    return set(columns) <= names


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"identity name must be a string, got {type(name).__name__}")
    cleaned = unicodedata.normalize("NFC", name).strip()
    if not cleaned:
        raise ValueError("identity name is empty")
    if len(cleaned) > MAX_NAME_LENGTH:
        raise ValueError(f"identity name {cleaned[:20]!r}... is {len(cleaned)} characters; at most {MAX_NAME_LENGTH}")
    if any(unicodedata.category(ch).startswith("C") for ch in cleaned):
        raise ValueError(f"identity name {cleaned!r} contains control characters")
    return cleaned


def _as_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _from_blob(blob: bytes, dim: int, what: str) -> np.ndarray:
    if len(blob) != 4 * dim:
        raise ValueError(f"stored {what} has {len(blob)} bytes, expected {4 * dim} (feature_dim {dim})")
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def _encode_png(image: np.ndarray | bytes) -> bytes:
    if isinstance(image, bytes):
        return image
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"face image must be (H, W, 3) uint8 RGB or encoded bytes, got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class Gallery:
    """Enrolled identities with 1:N open-set identification.

    Example:
        >>> g = Gallery("people.db", model_name="lvface_b")
        >>> alice = g.enrol("Alice", embeddings)          # (N, 512) from FaceEmbedder
        >>> g.identify(query_embeddings)[0].name          # "Alice" or None (unknown)

    Thread-safe within a process (one lock around the connection); several processes may open the
    same file, and each notices the others' writes before searching.
    """

    def __init__(self, path: str | Path = ":memory:", feature_dim: int = 512, threshold: float | None = None, *,
                 model_name: str | None = None, store_face_images: bool = False,
                 index: IndexConfig | str = "auto", config: GalleryConfig | None = None, create: bool = True,
                 disk_index: bool | str | Path | None = None) -> None:
        """``create=False`` opens an existing gallery only: a missing file raises ``FileNotFoundError``
        instead of silently starting an empty gallery (what a mistyped path should do for a read).

        ``disk_index`` (see ``GalleryConfig``): by default a file-backed gallery searches an on-disk
        index kept in ``<path>.people.idx/`` (``disk_sync.GalleryIndex``), opened at the first search
        and caught up with the file's changes, instead of loading every template at start."""
        if config is None:
            config = GalleryConfig(
                feature_dim=feature_dim, threshold=threshold, model_name=model_name,
                store_face_images=store_face_images,
                index=IndexConfig(kind=index) if isinstance(index, str) else index, disk_index=disk_index,
            )
        self.config = config
        self.path = str(path)
        self._lock = threading.RLock()
        if self.path != ":memory:":
            parent = Path(self.path).expanduser().resolve().parent
            if not parent.is_dir():
                raise FileNotFoundError(f"gallery {self.path}: folder {parent} does not exist")
            if not create and not Path(self.path).expanduser().is_file():
                raise FileNotFoundError(f"no gallery at {self.path}: the file does not exist")
        self._create = create
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=_BUSY_SECONDS)
        try:
            _retry_when_busy(self._setup)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            busy = _is_busy(exc)
            raise ValueError(f"gallery {self.path}: " + (
                f"still locked by another process after {_BUSY_SECONDS:.0f} s ({exc})" if busy
                else f"not a readable gallery database ({exc})")) from exc
        except BaseException:
            self._conn.close()
            raise
        self._index: VectorIndex = create_index(config.feature_dim, config.index)
        self._names: dict[int, str] = {}
        self._data_version = -1
        from .disk_sync import resolve_index_path  # disk_sync imports this module

        self.disk_index_path = resolve_index_path(self.path, config.disk_index, config.index.kind, "people")
        self._on_disk: Any = None  # the GalleryIndex, opened at the first search
        self._reload()

    # ---------------------------------------------------------------- setup and bookkeeping
    def _setup(self) -> None:
        c = self._conn
        self._check_tables(c)  # before any PRAGMA that would change a file that is not ours
        # Switching to WAL needs a moment of exclusive access, so only ask when the file is not WAL
        # yet (several processes opening one gallery then never contend for it).
        if str(c.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            c.execute("PRAGMA journal_mode=WAL")  # ':memory:' silently keeps its own mode
        c.execute(f"PRAGMA synchronous={self.config.synchronous}")
        c.execute("PRAGMA foreign_keys=ON")
        c.execute("PRAGMA secure_delete=ON")
        self._create_schema()

    def _check_tables(self, c: sqlite3.Connection) -> None:
        """Refuse another application's SQLite file rather than adding tables to it, and refuse to
        start a gallery in an existing file when only opening was asked for."""
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        foreign = sorted(t for t in tables - GALLERY_TABLES if not t.startswith(SHARED_TABLE_PREFIXES))
        if "meta" in tables and not foreign:
            keys = {r[0] for r in c.execute("SELECT key FROM meta")} if _has_columns(c, "meta", "key", "value") \
                else {None}
            if keys and "schema_version" not in keys:
                foreign = ["meta"]
        if foreign:
            raise ValueError(f"gallery {self.path}: this SQLite file belongs to something else (tables "
                             f"{', '.join(foreign[:6])}); refusing to add gallery tables to it. Use a new file")
        if not self._create and not tables >= GALLERY_TABLES:
            raise FileNotFoundError(f"no gallery in {self.path}: the file holds no enrolled identities")

    def _create_schema(self) -> None:
        with self._transaction() as c:
            self._check_tables(c)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            stored = dict(c.execute("SELECT key, value FROM meta").fetchall())
            if not stored:
                c.execute("INSERT INTO meta VALUES ('schema_version', ?), ('feature_dim', ?)",
                          (str(SCHEMA_VERSION), str(self.config.feature_dim)))
                stored = {"schema_version": str(SCHEMA_VERSION), "feature_dim": str(self.config.feature_dim)}
            if int(stored["schema_version"]) > SCHEMA_VERSION:
                raise ValueError(f"gallery {self.path}: schema version {stored['schema_version']} is newer than this "
                                 f"library understands ({SCHEMA_VERSION}); upgrade lvface-mm")
            if int(stored["feature_dim"]) != self.config.feature_dim:
                raise ValueError(f"gallery {self.path}: stores {stored['feature_dim']}-d embeddings, "
                                 f"opened with feature_dim={self.config.feature_dim}")
            stored_model = stored.get("model_name")
            if self.config.model_name is not None:
                if stored_model is None:
                    c.execute("INSERT INTO meta VALUES ('model_name', ?)", (self.config.model_name,))
                elif stored_model != self.config.model_name:
                    raise ValueError(
                        f"gallery {self.path}: embeddings were made by {stored_model!r}, opened with model "
                        f"{self.config.model_name!r}; embeddings of different encoders are not comparable")
            self._stored_meta = dict(c.execute("SELECT key, value FROM meta").fetchall())

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change: BEGIN IMMEDIATE takes the write lock up front, so two writers queue
        instead of failing halfway; any exception rolls everything back."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _change(self) -> Iterator[tuple[sqlite3.Connection, list]]:
        """A write transaction plus the cache updates to run once it committed. If another connection
        committed since the cache was loaded, the cache is rebuilt instead: applying only our own
        change would hide theirs. (Inside BEGIN IMMEDIATE nobody else can commit, so the check is exact.)"""
        with self._lock:
            updates: list = []
            with self._transaction() as c:
                stale = self._current_data_version() != self._data_version
                yield c, updates
            if self.disk_index_path is not None:
                pass  # the on-disk index catches up by itself at the next search
            elif stale:
                self._reload()
            else:
                for update in updates:
                    update()

    def _reload(self) -> None:
        """Rebuild the template cache from the database.

        The version is read *before* the rows, inside one read transaction (one WAL snapshot): a
        commit landing in between then shows up as a newer version at the next ``_sync`` and is
        loaded. Read after the rows, it would be recorded as seen while its rows were missed."""
        with self._lock:
            if self.disk_index_path is not None:  # nothing cached in memory: the on-disk index follows the file
                self._data_version = self._current_data_version()
                return
            own = not self._conn.in_transaction
            if own:
                self._conn.execute("BEGIN")
            try:
                version = self._current_data_version()
                rows = self._conn.execute("SELECT id, name, template FROM identities ORDER BY id").fetchall()
            finally:
                if own:
                    self._conn.execute("COMMIT")
            self._index = create_index(self.config.feature_dim, self.config.index)
            self._names = {int(i): n for i, n, _ in rows}
            if rows:
                ids = np.array([r[0] for r in rows], np.int64)
                templates = np.stack([_from_blob(r[2], self.config.feature_dim, f"template of {r[1]!r}") for r in rows])
                self._index.add(ids, templates)
            self._data_version = version

    def _current_data_version(self) -> int:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _sync(self) -> None:
        """Reload when another connection committed since we last looked (PRAGMA data_version
        changes only for other connections' commits, so our own writes cost nothing here)."""
        if self._current_data_version() != self._data_version:
            self._reload()

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def model_name(self) -> str | None:
        return self.config.model_name or self._stored_meta.get("model_name")

    @property
    def threshold(self) -> float:
        """Current acceptance threshold: explicit config, else saved in the file, else the default."""
        if self.config.threshold is not None:
            return self.config.threshold
        saved = self._meta("threshold")
        if saved is not None:
            return float(saved)
        return default_threshold(self.model_name).threshold

    def save_threshold(self, threshold: float, far: float | None = None, source: str = "") -> None:
        """Persist a threshold (e.g. from ``calibrate``) in the file; it applies whenever the gallery
        is opened without an explicit ``threshold``."""
        if not (isinstance(threshold, (int, float)) and -1.0 <= threshold <= 1.0 and math.isfinite(threshold)):
            raise ValueError(f"threshold={threshold!r}: expected a cosine in [-1, 1]")
        info = json.dumps({"far": far, "source": source, "saved_at": time.time()})
        with self._transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES ('threshold', ?)", (repr(float(threshold)),))
            c.execute("INSERT OR REPLACE INTO meta VALUES ('threshold_info', ?)", (info,))
        if self.config.threshold is not None:
            # An explicit constructor threshold still wins for this session; say so instead of surprising.
            import warnings

            warnings.warn(f"threshold saved, but this Gallery was opened with threshold={self.config.threshold}",
                          stacklevel=2)

    @property
    def encoder(self) -> dict[str, Any] | None:
        """How this gallery's embeddings were made, as saved by ``remember_encoder`` (the CLI keeps
        the model name, checkpoint file and its sha256, and the seed of random weights), so later
        commands need no model flags. None when nothing was saved."""
        raw = self._meta("encoder")
        return None if raw is None else dict(json.loads(raw))

    def remember_encoder(self, info: Mapping[str, Any]) -> None:
        """Save ``info`` (a JSON-serialisable dict) as the gallery's encoder, once: a different
        encoder later is refused, because embeddings of different encoders are not comparable."""
        text = json.dumps(dict(info), sort_keys=True)
        with self._transaction() as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'encoder'").fetchone()
            if row is not None and json.loads(row[0]) != json.loads(text):
                raise ValueError(f"gallery {self.path}: made with encoder {row[0]}, not {text}; "
                                 "embeddings of different encoders are not comparable")
            if row is None:
                c.execute("INSERT INTO meta VALUES ('encoder', ?)", (text,))

    def _meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # ---------------------------------------------------------------- validation helpers
    def _embeddings(self, embeddings: np.ndarray | Sequence, what: str = "embeddings") -> np.ndarray:
        try:
            x = np.asarray(embeddings, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what}: expected numbers shaped (N, {self.feature_dim}) ({exc})") from exc
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.feature_dim or len(x) == 0:
            raise ValueError(f"{what}: expected shape (N, {self.feature_dim}) with N >= 1, got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{what}: contains NaN or infinity")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if np.any(norms < 1e-12):
            raise ValueError(f"{what}: row(s) {np.flatnonzero(norms[:, 0] < 1e-12).tolist()} are all zeros")
        return (x / norms).astype(np.float32)

    @staticmethod
    def _qualities(quality: float | Sequence[float] | np.ndarray | None, n: int) -> np.ndarray:
        if quality is None:
            return np.ones(n, np.float64)
        q = np.broadcast_to(np.asarray(quality, dtype=np.float64), (n,)) if np.ndim(quality) == 0 else \
            np.asarray(quality, dtype=np.float64).reshape(-1)
        if len(q) != n:
            raise ValueError(f"quality: {len(q)} values for {n} embeddings")
        if not np.all(np.isfinite(q)) or np.any(q <= 0):
            raise ValueError(f"quality: expected positive finite weights, got {q.tolist()}")
        return q.copy()

    def _template(self, embeddings: np.ndarray, qualities: np.ndarray, name: str) -> np.ndarray:
        mean = (qualities[:, None] * embeddings.astype(np.float64)).sum(0) / qualities.sum()
        norm = np.linalg.norm(mean)
        if norm < 1e-6:
            raise ValueError(f"enrolment of {name!r}: the embeddings cancel out (their weighted mean is zero); "
                             "they cannot be the same person")
        return (mean / norm).astype(np.float32)

    def _resolve(self, c: sqlite3.Connection, who: str | int) -> tuple[int, str]:
        if isinstance(who, (int, np.integer)) and not isinstance(who, bool):
            row = c.execute("SELECT id, name FROM identities WHERE id = ?", (int(who),)).fetchone()
        elif isinstance(who, str):
            row = c.execute("SELECT id, name FROM identities WHERE name = ?", (_check_name(who),)).fetchone()
        else:
            raise TypeError(f"identity must be a name (str) or an id (int), got {type(who).__name__}")
        if row is None:
            raise KeyError(f"no identity {who!r} in gallery {self.path}")
        return int(row[0]), row[1]

    # ---------------------------------------------------------------- changes
    def enrol(self, name: str, embeddings: np.ndarray | Sequence, quality: float | Sequence[float] | None = None,
              metadata: Mapping[str, Any] | None = None, *, face_images: Sequence[np.ndarray | bytes] | None = None,
              replace: bool = False) -> int:
        """Add a person (or more samples of an existing one) and return the identity id.

        Args:
            name: display name; unique, compared case-insensitively.
            embeddings: (N, feature_dim) or one (feature_dim,) embedding; normalised here.
            quality: per-embedding positive weight (e.g. detector score) for the template mean.
            metadata: JSON-serialisable dict, merged into what the identity already has.
            face_images: aligned crops to keep next to the embeddings; only with
                ``store_face_images=True``.
            replace: drop the identity's earlier samples instead of adding to them.
        """
        name = _check_name(name)
        x = self._embeddings(embeddings, f"embeddings for {name!r}")
        q = self._qualities(quality, len(x))
        if face_images is not None:
            if not self.config.store_face_images:
                raise ValueError("face_images given, but this gallery stores embeddings only; "
                                 "open it with store_face_images=True to keep face crops")
            if len(face_images) != len(x):
                raise ValueError(f"face_images: {len(face_images)} images for {len(x)} embeddings")
            images: list[bytes | None] = [_encode_png(img) for img in face_images]
        else:
            images = [None] * len(x)
        extra = dict(metadata or {})
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata for {name!r} must be JSON-serialisable: {exc}") from exc
        with self._change() as (c, updates):
            identity_id, template = self._write_identity(c, name, x, q, extra, images, replace)
            stored_name = c.execute("SELECT name FROM identities WHERE id = ?", (identity_id,)).fetchone()[0]
            updates.append(lambda: self._index.add(np.array([identity_id]), template[None]))
            updates.append(lambda: self._names.__setitem__(identity_id, stored_name))
        return identity_id

    def _write_identity(self, c: sqlite3.Connection, name: str, x: np.ndarray, q: np.ndarray, meta: dict,
                        images: Sequence[bytes | None], replace: bool) -> tuple[int, np.ndarray]:
        """Insert or extend one identity inside the caller's transaction; returns (id, new template)."""
        now = time.time()
        row = c.execute("SELECT id, metadata FROM identities WHERE name = ?", (name,)).fetchone()
        if row is None:
            identity_id = int(c.execute(
                "INSERT INTO identities (name, template, metadata, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (name, _as_blob(self._template(x, q, name)), json.dumps(meta), now, now)).lastrowid)
        else:
            identity_id = int(row[0])
            meta = {**json.loads(row[1]), **meta}
            if replace:
                c.execute("DELETE FROM samples WHERE identity_id = ?", (identity_id,))
        c.executemany(
            "INSERT INTO samples (identity_id, embedding, quality, face_image, created_at) VALUES (?, ?, ?, ?, ?)",
            [(identity_id, _as_blob(e), float(w), img, now) for e, w, img in zip(x, q, images)])
        all_x, all_q = self._samples(c, identity_id)
        template = self._template(all_x, all_q, name)
        c.execute("UPDATE identities SET template = ?, metadata = ?, updated_at = ? WHERE id = ?",
                  (_as_blob(template), json.dumps(meta), now, identity_id))
        return identity_id, template

    def _samples(self, c: sqlite3.Connection, identity_id: int) -> tuple[np.ndarray, np.ndarray]:
        rows = c.execute("SELECT embedding, quality FROM samples WHERE identity_id = ? ORDER BY id",
                         (identity_id,)).fetchall()
        x = np.stack([_from_blob(r[0], self.feature_dim, "sample embedding") for r in rows])
        return x, np.array([r[1] for r in rows], np.float64)

    def rename(self, who: str | int, new_name: str) -> None:
        """Change an identity's name (by current name or id); the new name must be free."""
        new_name = _check_name(new_name)
        with self._change() as (c, updates):
            identity_id, old = self._resolve(c, who)
            clash = c.execute("SELECT id FROM identities WHERE name = ? AND id != ?",
                              (new_name, identity_id)).fetchone()
            if clash is not None:
                raise ValueError(f"cannot rename {old!r} to {new_name!r}: that name is already enrolled")
            c.execute("UPDATE identities SET name = ?, updated_at = ? WHERE id = ?",
                      (new_name, time.time(), identity_id))
            updates.append(lambda: self._names.__setitem__(identity_id, new_name))

    def delete(self, who: str | int) -> int:
        """Remove an identity and all its samples (by name or id); returns the deleted id.

        The rows' bytes are zeroed in the file (secure_delete) and the WAL is checkpointed and
        truncated so no older copy of the pages survives there either.
        """
        with self._change() as (c, updates):
            identity_id, _ = self._resolve(c, who)
            c.execute("DELETE FROM samples WHERE identity_id = ?", (identity_id,))
            c.execute("DELETE FROM identities WHERE id = ?", (identity_id,))
            updates.append(lambda: self._index.remove(np.array([identity_id])))
            updates.append(lambda: self._names.pop(identity_id, None))
        self._scrub()
        with self._lock:  # the on-disk index zeroes the person's template now, not at the next search
            if self.disk_index_path is not None and self.disk_index_path.exists() and self._open_disk_index():
                self._on_disk.sync()
        return identity_id

    def _scrub(self) -> None:
        """Copy the WAL into the main file and truncate it, so pre-delete page images are gone."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def vacuum(self) -> None:
        """Rebuild the file compactly (after many deletions); also drops any free pages."""
        with self._lock:
            self._conn.execute("VACUUM")
            self._scrub()

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM identities").fetchone()[0])

    def __contains__(self, who: object) -> bool:
        if not isinstance(who, (str, int)):
            return False
        with self._lock:
            try:
                self._resolve(self._conn, who)
            except (KeyError, ValueError):
                return False
        return True

    def list_identities(self) -> list[Identity]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT i.id, i.name, COUNT(s.id), i.metadata, i.created_at, i.updated_at FROM identities i "
                "LEFT JOIN samples s ON s.identity_id = i.id GROUP BY i.id ORDER BY i.name COLLATE NOCASE").fetchall()
        return [Identity(int(r[0]), r[1], int(r[2]), json.loads(r[3]), r[4], r[5]) for r in rows]

    def get(self, who: str | int) -> Identity:
        with self._lock:
            identity_id, _ = self._resolve(self._conn, who)
        return next(i for i in self.list_identities() if i.identity_id == identity_id)

    def template(self, who: str | int) -> np.ndarray:
        """The identity's normalised template, (feature_dim,) float32."""
        with self._lock:
            identity_id, name = self._resolve(self._conn, who)
            blob = self._conn.execute("SELECT template FROM identities WHERE id = ?", (identity_id,)).fetchone()[0]
        return _from_blob(blob, self.feature_dim, f"template of {name!r}")

    def samples(self, who: str | int) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (N, feature_dim), qualities (N,)) enrolled for one identity."""
        with self._lock:
            identity_id, _ = self._resolve(self._conn, who)
            return self._samples(self._conn, identity_id)

    def face_images(self, who: str | int) -> list[bytes]:
        """PNG bytes of stored face crops (empty unless enrolled with ``face_images``)."""
        with self._lock:
            identity_id, _ = self._resolve(self._conn, who)
            rows = self._conn.execute("SELECT face_image FROM samples WHERE identity_id = ? AND face_image IS NOT NULL "
                                      "ORDER BY id", (identity_id,)).fetchall()
        return [r[0] for r in rows]

    def search(self, embeddings: np.ndarray | Sequence, k: int = 5) -> list[list[Identification]]:
        """Top-``k`` candidates per query, best first, whatever their score (no threshold)."""
        x = self._embeddings(embeddings, "query embeddings")
        with self._lock:
            if self.disk_index_path is not None and self._open_disk_index() is not None:
                return self._on_disk.search(x, k)
            self._sync()
            scores, ids = self._index.search(x, k)
            names = dict(self._names)
        return [[Identification(names[int(i)], float(s), int(i)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def identify(self, embeddings: np.ndarray | Sequence, threshold: float | None = None) -> list[Identification]:
        """Best enrolled identity per query, or unknown (name None) when its score < threshold."""
        return best_or_unknown(self.search(embeddings, k=1), self.threshold if threshold is None else float(threshold))

    def _open_disk_index(self) -> Any:
        """The ``GalleryIndex`` (opened, caught up or rebuilt on first use), or None when another
        process or object holds its folder: then this gallery searches in memory (logged once)."""
        from .disk_sync import GalleryIndex, IndexInUseError, disk_index_config

        if self._on_disk is None:
            try:
                self._on_disk = GalleryIndex(self.disk_index_path, self.path, disk_index_config())
            except IndexInUseError as exc:
                _log.warning("%s; searching an in-memory index instead", exc)
                self.disk_index_path = None
                self._reload()
        return self._on_disk

    # ---------------------------------------------------------------- export / import
    def export(self, path: str | Path) -> Path:
        """Write every identity (names, samples, qualities, metadata; no face images) to an ``.npz``."""
        path = Path(path)
        with self._lock:
            identities = self._conn.execute("SELECT id, name, metadata FROM identities ORDER BY id").fetchall()
            samples = self._conn.execute("SELECT identity_id, embedding, quality FROM samples ORDER BY id").fetchall()
        position = {int(r[0]): n for n, r in enumerate(identities)}
        header = {"format": EXPORT_FORMAT, "version": SCHEMA_VERSION, "feature_dim": self.feature_dim,
                  "model_name": self.model_name, "encoder": self.encoder, "names": [r[1] for r in identities],
                  "metadata": [json.loads(r[2]) for r in identities]}
        embeddings = np.stack([_from_blob(s[1], self.feature_dim, "sample") for s in samples]) if samples else \
            np.zeros((0, self.feature_dim), np.float32)
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as f:  # write aside, then rename: a crash never leaves half an export
            np.savez(f, header=np.array(json.dumps(header)), embeddings=embeddings,
                     quality=np.array([s[2] for s in samples], np.float64),
                     owner=np.array([position[int(s[0])] for s in samples], np.int64))
        tmp.replace(path)
        return path

    def import_(self, path: str | Path, on_conflict: str = "error") -> list[int]:
        """Add identities from an ``export`` file, all or nothing; returns their ids.

        Args:
            on_conflict: when a name already exists: ``"error"`` (nothing imported), ``"skip"``,
                ``"merge"`` (add the samples) or ``"replace"`` (drop the old samples).
        """
        if on_conflict not in ("error", "skip", "merge", "replace"):
            raise ValueError(f"on_conflict={on_conflict!r}: expected error, skip, merge or replace")
        names, metadata, groups, model_name = self._read_export(Path(path))
        with np.load(path, allow_pickle=False) as data:  # already validated by _read_export
            encoder = json.loads(str(data["header"])).get("encoder")
        existing = {i.name.casefold() for i in self.list_identities()}
        clashes = [n for n in names if n.casefold() in existing]
        if clashes and on_conflict == "error":
            raise NameConflictError(path, clashes)
        ids: list[int] = []
        try:
            with self._transaction() as c:  # one transaction: a failure or a kill imports nothing
                if self.model_name is None and model_name:  # a new gallery takes the file's encoder
                    c.execute("INSERT OR IGNORE INTO meta VALUES ('model_name', ?)", (model_name,))
                if encoder and self.encoder is None:  # ... and how it was made, when known
                    c.execute("INSERT OR IGNORE INTO meta VALUES ('encoder', ?)",
                              (json.dumps(encoder, sort_keys=True),))
                for name, meta, (x, q) in zip(names, metadata, groups):
                    if name.casefold() in existing and on_conflict == "skip":
                        continue
                    ids.append(self._write_identity(c, name, x, q, dict(meta), [None] * len(x),
                                                    replace=on_conflict == "replace")[0])
            if model_name:
                self._stored_meta.setdefault("model_name", model_name)
        finally:
            self._reload()
        return ids

    def _read_export(self, path: Path) -> tuple[list[str], list[dict], list[tuple[np.ndarray, np.ndarray]], str | None]:
        """Load and fully validate an export before anything is written."""
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                embeddings, quality, owner = data["embeddings"], data["quality"], data["owner"]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"import {path}: not a gallery export ({exc.__class__.__name__}: {exc})") from exc
        if header.get("format") != EXPORT_FORMAT:
            raise ValueError(f"import {path}: format {header.get('format')!r}, expected {EXPORT_FORMAT!r}")
        if header.get("feature_dim") != self.feature_dim:
            raise ValueError(f"import {path}: {header.get('feature_dim')}-d embeddings, "
                             f"gallery is {self.feature_dim}-d")
        theirs, ours = header.get("model_name"), self.model_name
        if theirs and ours and theirs != ours:
            raise ValueError(f"import {path}: embeddings from {theirs!r}, gallery holds {ours!r}")
        names = [_check_name(n) for n in header["names"]]
        if len({n.casefold() for n in names}) != len(names):
            raise ValueError(f"import {path}: duplicate names in the file")
        groups = []
        for position, name in enumerate(names):
            rows = owner == position
            if not rows.any():
                raise ValueError(f"import {path}: identity {name!r} has no samples")
            x = self._embeddings(embeddings[rows], f"import {path}: embeddings of {name!r}")
            groups.append((x, self._qualities(quality[rows], int(rows.sum()))))
        return names, list(header["metadata"]), groups, theirs

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        with self._lock:
            if self._on_disk is not None:
                self._on_disk.close()
                self._on_disk = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Gallery({self.path!r}, identities={len(self)}, threshold={self.threshold:.3f})"
