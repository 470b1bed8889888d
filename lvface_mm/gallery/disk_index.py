"""Nearest-neighbour search over millions of faces from an index that lives on disk.

An index is a folder:

- ``manifest.json``: format, dimension, configuration, row count, the current file names, and an
  opaque ``source`` state that a syncing layer (``disk_sync.py``) uses to catch up incrementally.
- ``vectors.<gen>.f16``: every row's vector, float16, appended; memory-mapped, never loaded whole.
  These are the exact vectors the candidates are re-scored with.
- ``ids.<gen>.i64``: every row's caller id, int64; a deleted row is overwritten with -1 (tombstone).
- ``coarse.<gen>.*``: the candidate stage's codes (``pq`` only: fast-scan blocks, plain codes, row map), saved now
  and then; rows appended after the last save are encoded again when the index is opened.

Search = candidate stage + exact re-ranking. The candidate stage is chosen by size (``auto``):

- ``flat``: exact scores from an in-memory float32 copy; used while small (< ``flat_below`` rows).
- ``pq``: FAISS fast-scan product quantisation (``pq_m`` sub-quantisers of 4 bits, 32 bytes a
  512-d face at the default 64), scanned in full, then the top ``rerank`` candidates are re-scored
  exactly from the float16 vectors. Partition-based indexes (IVF) and graphs (HNSW) are not chosen:
  face identities spread nearly uniformly over the sphere, so a genuine query's template often sits
  in another IVF cell, and HNSW's build time and memory grow badly (benchmarks/results/search.md).

Deletes tombstone the row in the ids file and, in batches, drop it from the candidate stage;
``compact`` (run automatically once a quarter of the rows are dead) rewrites the files.
The manifest is replaced atomically after the row files were written, so a crash at any moment
leaves either the old or the new state; rows written past the manifest's count are cut off at open.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DiskIndex",
    "DiskIndexConfig",
    "IndexFileError",
    "list_stages",
    "register_stage",
]

FORMAT = "lvface-mm-disk-index"
VERSION = 1
MANIFEST = "manifest.json"
_log = logging.getLogger(__name__)


class IndexFileError(ValueError):
    """An index file is missing, foreign (not this format or made for other data) or corrupt."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


@dataclass(frozen=True)
class DiskIndexConfig:
    """How an on-disk index searches.

    Attributes:
        kind: candidate stage, a registered name (``list_stages()``) or ``auto`` (flat, then pq
            once past ``flat_below`` live rows).
        flat_below: for ``auto``, the size at which the PQ stage is trained.
        pq_m: PQ sub-quantisers (4 bits each); must divide the dimension. 64 for 512-d faces.
        rerank: PQ candidates per query that are re-scored exactly (recall/latency knob). 256: a
            genuine query at cosine ~0.3 can rank a few hundred deep in the PQ order at 1M faces.
        train_size: at most this many vectors train the quantiser (a random sample).
        purge_every: deleted rows tolerated in the PQ stage (searched past) before they are removed.
        compact_ratio: rewrite the files once this fraction of rows is dead.
        scan_threads: threads that scan the PQ codes for one search, each over a contiguous part
            (FAISS scans one query on one thread). A latency knob for cores a query has to itself:
            on an idle 2-core machine 2 cut the p99 at 10M faces from 94 to 41 ms, at 1M it gained
            little, and on a busy machine it only adds contention (benchmarks/results/search.md).
            Used from ``scan_threads`` x 50,000 live rows on; the parts hold a second in-memory copy
            of the PQ codes (``pq_m / 2`` bytes a face).
    """

    kind: str = "auto"
    flat_below: int = 20_000
    pq_m: int = 64
    rerank: int = 256
    train_size: int = 65_536
    purge_every: int = 256
    compact_ratio: float = 0.25
    scan_threads: int = 1

    def __post_init__(self) -> None:
        if self.kind != "auto" and self.kind not in _STAGES:
            raise ValueError(f"DiskIndexConfig.kind={self.kind!r}: expected 'auto' or one of {list_stages()}")
        for name in ("flat_below", "pq_m", "rerank", "train_size", "purge_every", "scan_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiskIndexConfig.{name}={value!r}: expected a positive integer")
        if not 0.0 < self.compact_ratio <= 1.0:
            raise ValueError(f"DiskIndexConfig.compact_ratio={self.compact_ratio!r}: expected a fraction in (0, 1]")

    def stage_for(self, live_rows: int, dim: int) -> str:
        if self.kind != "auto":
            return self.kind
        # A dimension pq_m does not divide cannot be quantised: `auto` then stays exact.
        return "flat" if live_rows < self.flat_below or dim % self.pq_m else "pq"


# ----------------------------------------------------------------------------- candidate stages
class Stage(ABC):
    """Proposes candidate rows for each query; the index re-scores them exactly."""

    def __init__(self, dim: int, config: DiskIndexConfig) -> None:
        self.dim, self.config = dim, config

    @abstractmethod
    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Index ``rows`` (N,) with their float32 ``vectors`` (N, dim)."""

    @abstractmethod
    def forget(self, alive: np.ndarray) -> None:
        """Rows whose ``alive[row]`` is False were deleted: stop proposing them (may be lazy)."""

    @abstractmethod
    def candidates(self, queries: np.ndarray, k: int, row_ids: np.ndarray) -> np.ndarray:
        """(Q, >=k) candidate rows per query, best first, -1 padded; may include dead rows
        (``row_ids[row] == -1``)."""

    def train(self, sample: np.ndarray) -> None:  # noqa: B027 - most stages need no training
        """Fit to a sample of the data (float32 (N, dim)) before the first ``add``."""

    def save(self, prefix: Path) -> list[str]:
        """Write to files named ``prefix``*; return their names (nothing to save by default)."""
        return []

    def load(self, prefix: Path) -> int:
        """Read what ``save`` wrote; returns 1 + the highest row it holds (0 when empty)."""
        return 0

    @abstractmethod
    def renumber(self, live: np.ndarray) -> None:
        """The files were compacted: row ``live[j]`` is now row ``j`` and every other row is gone."""


_STAGES: dict[str, Callable[[int, DiskIndexConfig], Stage]] = {}


def register_stage(name: str) -> Callable[[type[Stage]], type[Stage]]:
    """Class decorator: make a candidate stage available as ``DiskIndexConfig(kind=name)``."""

    def wrap(cls: type[Stage]) -> type[Stage]:
        if name in _STAGES or name == "auto":
            raise ValueError(f"disk index stage {name!r} is already registered")
        _STAGES[name] = cls
        return cls

    return wrap


def list_stages() -> list[str]:
    return sorted(_STAGES)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest per row, best first. scores: (Q, N)."""
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    row = np.arange(len(scores))[:, None]  # plain fancy indexing: take_along_axis costs ~50 us a call
    order = np.argsort(-scores[row, top], axis=1, kind="stable")
    return top[row, order]


@register_stage("flat")
class FlatStage(Stage):
    """Exact scores against a float32 copy held in memory: for small indexes, where it is fast enough."""

    def __init__(self, dim: int, config: DiskIndexConfig) -> None:
        super().__init__(dim, config)
        self._vectors = np.zeros((0, dim), np.float32)
        self._rows = np.zeros(0, np.int64)
        self._size = 0

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        need = self._size + len(rows)
        if need > len(self._vectors):  # grow geometrically: many one-row adds stay linear overall
            capacity = max(need, 2 * len(self._vectors), 1024)
            grown = np.zeros((capacity, self.dim), np.float32)
            grown[: self._size] = self._vectors[: self._size]
            grown_rows = np.full(capacity, -1, np.int64)
            grown_rows[: self._size] = self._rows[: self._size]
            self._vectors, self._rows = grown, grown_rows
        self._vectors[self._size : need] = vectors
        self._rows[self._size : need] = rows
        self._size = need

    def forget(self, alive: np.ndarray) -> None:
        pass  # dead rows get score -inf at query time; compaction drops them

    def renumber(self, live: np.ndarray) -> None:
        rows = self._rows[: self._size]
        keep = np.flatnonzero(np.isin(rows, live))
        self._vectors = self._vectors[keep]
        self._rows = np.searchsorted(live, rows[keep]).astype(np.int64)
        self._size = len(keep)

    def candidates(self, queries: np.ndarray, k: int, row_ids: np.ndarray) -> np.ndarray:
        n = self._size
        if n == 0:
            return np.full((len(queries), 0), -1, np.int64)
        scores = queries @ self._vectors[:n].T  # (Q, n)
        scores[:, row_ids[self._rows[:n]] < 0] = -np.inf
        return self._rows[:n][_top_k(scores, k)]


@register_stage("pq")
class PQFastScanStage(Stage):
    """FAISS ``IndexPQFastScan`` (4-bit codes in SIMD-friendly blocks), scanned in full.

    FAISS labels the entries by position, so ``_rows[position]`` maps back to rows. A plain
    ``IndexPQ`` holding the same codes is kept beside it because fast-scan's own ``remove_ids``
    leaves it unable to find later additions (faiss 1.15): deletions are applied to the plain
    codes (order-preserving) and the fast-scan blocks re-packed from them, without re-encoding."""

    _bulk = 4096  # adds at least this big go to the plain codes only; the blocks are re-packed once
    # Rows per SIMD block: FAISS's default. 64 and 128 measured the same CPU time per query at 1M
    # (interleaved on AVX2 Zen 3: 5.35 vs 5.28 ms; benchmarks/results/search.md).
    _bbs = 32
    split_rows = 50_000  # fewest rows per scan thread: below that the threads cost more than they save

    def __init__(self, dim: int, config: DiskIndexConfig) -> None:
        super().__init__(dim, config)
        if dim % config.pq_m:
            raise ValueError(f"DiskIndexConfig.pq_m={config.pq_m} must divide the dimension {dim}")
        faiss = _import_faiss()
        self._fast = faiss.IndexPQFastScan(dim, config.pq_m, 4, faiss.METRIC_INNER_PRODUCT, self._bbs)
        self._plain = faiss.IndexPQ(dim, config.pq_m, 4, faiss.METRIC_INNER_PRODUCT)
        self._plain_file: Path | None = None  # set while the plain codes are on disk, not yet read
        self._stale = False  # True when _plain holds codes that _fast lacks
        self._rows = np.zeros(0, np.int64)
        self._pending_dead = 0
        # scan_threads > 1: (first position, fast-scan index over a contiguous slice of the codes)
        self._parts: list[tuple[int, Any]] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def train(self, sample: np.ndarray) -> None:
        faiss = _import_faiss()
        # k-means on 64 tiny sub-spaces: too little work per OpenMP region to share, and on a busy
        # machine spinning threads made it 15x slower (58 s vs 3.7 s for 65k vectors on 2 cores).
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            self._fast.train(np.ascontiguousarray(sample, np.float32))
        finally:
            faiss.omp_set_num_threads(threads)
        self._plain.pq = self._fast.pq  # same quantiser (copied), so both make identical codes
        self._plain.is_trained = True

    def _repack(self) -> None:
        faiss = _import_faiss()
        self._fast = faiss.IndexPQFastScan(self._codes(), self._bbs)
        self._stale, self._parts = False, None

    def _split(self, count: int) -> None:
        """Fast-scan indexes over `count` contiguous slices of the plain codes (copied, not re-encoded)."""
        faiss = _import_faiss()
        plain = self._codes()
        total, size = int(plain.ntotal), int(plain.code_size)
        codes = faiss.vector_to_array(plain.codes)  # (total * code_size,) uint8
        bounds = np.linspace(0, total, count + 1).astype(np.int64)
        parts = []
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            part = faiss.IndexPQ(self.dim, self.config.pq_m, 4, faiss.METRIC_INNER_PRODUCT)
            part.pq, part.is_trained = plain.pq, True
            faiss.copy_array_to_vector(codes[lo * size : hi * size], part.codes)
            part.ntotal = hi - lo
            parts.append((lo, faiss.IndexPQFastScan(part, self._bbs)))
        self._parts = parts
        if self._pool is None or self._pool_size != count:
            self._pool, self._pool_size = ThreadPoolExecutor(count, thread_name_prefix="pq-scan"), count

    def _scan_parts(self, queries: np.ndarray, want: int) -> np.ndarray:
        """Scan every part on its own thread (FAISS releases the GIL) and merge by PQ score."""
        assert self._parts is not None and self._pool is not None

        def scan(part: tuple[int, Any]) -> tuple[np.ndarray, np.ndarray]:
            lo, index = part
            scores, positions = index.search(queries, min(want, int(index.ntotal)))
            return scores, np.where(positions >= 0, positions + lo, -1)

        found = list(self._pool.map(scan, self._parts))
        scores = np.concatenate([s for s, _ in found], axis=1)  # (Q, sum of each part's want)
        positions = np.concatenate([p for _, p in found], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :want]  # FAISS gives missing results -inf
        return np.take_along_axis(positions, order, axis=1)

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, np.float32)
        self._codes().add(vectors)
        if self._stale or len(vectors) >= self._bulk:
            self._stale = True
        else:
            self._fast.add(vectors)  # encodes a second time, cheaper than re-packing everything
            if self._parts is not None:  # the new positions follow the last part's
                self._parts[-1][1].add(vectors)
        self._rows = np.concatenate([self._rows, rows.astype(np.int64)])

    def forget(self, alive: np.ndarray) -> None:
        self._pending_dead += 1
        if self._pending_dead >= self.config.purge_every:
            self.purge(alive)

    def purge(self, alive: np.ndarray) -> None:
        """Remove dead rows from the codes now (one pass over the codes, no re-encoding)."""
        faiss = _import_faiss()
        dead = np.flatnonzero(~alive[self._rows])
        if len(dead):
            self._codes().remove_ids(faiss.IDSelectorBatch(dead.astype(np.int64)))
            self._rows = np.delete(self._rows, dead)
            self._stale = True
        self._pending_dead = 0

    def renumber(self, live: np.ndarray) -> None:
        alive = np.zeros(int(max(live.max(initial=-1), self._rows.max(initial=-1))) + 1, bool)
        alive[live] = True
        self.purge(alive)
        self._rows = np.searchsorted(live, self._rows).astype(np.int64)

    def candidates(self, queries: np.ndarray, k: int, row_ids: np.ndarray) -> np.ndarray:
        if self._stale:
            self._repack()
        total = int(self._fast.ntotal)
        if total == 0:
            return np.full((len(queries), 0), -1, np.int64)
        # Ask for enough more to step over every not-yet-purged dead row (bounded by purge_every).
        want = min(total, max(k, self.config.rerank) + self._pending_dead)
        queries = np.ascontiguousarray(queries, np.float32)
        threads = self.config.scan_threads
        if threads > 1 and total >= threads * self.split_rows:
            if self._parts is None or len(self._parts) != threads:
                self._split(threads)
            positions = self._scan_parts(queries, want)
        else:
            _, positions = self._fast.search(queries, want)
        return np.where(positions >= 0, self._rows[np.maximum(positions, 0)], -1)

    @staticmethod
    def _names(prefix: Path) -> tuple[Path, Path, Path]:
        return tuple(prefix.with_name(prefix.name + suffix) for suffix in (".fast.faiss", ".codes.faiss", ".rows.npy"))

    def save(self, prefix: Path) -> list[str]:
        faiss = _import_faiss()
        if self._stale:
            self._repack()
        fast, plain, rows = self._names(prefix)
        faiss.write_index(self._fast, str(fast))
        faiss.write_index(self._codes(), str(plain))
        np.save(rows, self._rows)
        return [fast.name, plain.name, rows.name]

    def _read(self, path: Path, kind: type) -> Any:
        faiss = _import_faiss()
        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, OSError) as exc:
            raise IndexFileError(path, f"unreadable PQ codes ({str(exc).strip().splitlines()[-1][:200]})") from exc
        if type(index) is not kind or index.d != self.dim or int(index.pq.M) != self.config.pq_m:
            raise IndexFileError(path, f"not a {self.config.pq_m}x4-bit {kind.__name__} of dimension {self.dim}")
        if int(index.ntotal) != len(self._rows):
            raise IndexFileError(path, f"{index.ntotal} codes for {len(self._rows)} row numbers")
        return index

    def _codes(self) -> Any:
        """The plain codes: read on first need (changes, not searches), which halves the start time."""
        if self._plain_file is not None:
            self._plain, self._plain_file = self._read(self._plain_file, _import_faiss().IndexPQ), None
        return self._plain

    def load(self, prefix: Path) -> int:
        faiss = _import_faiss()
        fast, plain, rows = self._names(prefix)
        try:
            saved_rows = np.load(rows, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise IndexFileError(rows, f"unreadable row numbers ({exc})") from exc
        self._rows = saved_rows.astype(np.int64)
        self._fast = self._read(fast, faiss.IndexPQFastScan)
        # The plain codes are read when first needed; a file too short to hold them is caught now.
        size = plain.stat().st_size if plain.is_file() else -1
        if size < len(self._rows) * self.config.pq_m // 2:
            raise IndexFileError(plain, "missing" if size < 0 else f"{size} bytes: too short for "
                                        f"{len(self._rows)} codes of {self.config.pq_m // 2} bytes")
        self._plain_file, self._pending_dead, self._stale, self._parts = plain, 0, False, None
        return int(saved_rows.max()) + 1 if len(saved_rows) else 0


def _import_faiss():  # noqa: ANN202 - the module type is faiss's own
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("the 'pq' disk index stage needs `pip install faiss-cpu` (the [demo] extra); "
                          "DiskIndexConfig(kind='flat') works without it") from exc
    return faiss


# ----------------------------------------------------------------------------- the index
_FP16_DECODERS: dict[int, Any] = {}


def _widen(half: np.ndarray) -> np.ndarray:
    """float16 rows (N, dim) -> float32 (N, dim). FAISS's fp16 decoder (F16C) when FAISS is there:
    numpy's ``astype`` took 0.38 ms for the 256 re-ranked rows of one query, FAISS 0.19 ms."""
    dim = half.shape[1]
    if dim not in _FP16_DECODERS:
        try:
            import faiss
        except ImportError:
            _FP16_DECODERS[dim] = None
        else:
            _FP16_DECODERS[dim] = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)
    decoder = _FP16_DECODERS[dim]
    if decoder is None or len(half) == 0:
        return half.astype(np.float32)
    return decoder.decode(np.ascontiguousarray(half).view(np.uint8))


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write aside, then rename: a killed process leaves the old or the new file, never half of one.
    No fsync: the index is a cache of its source, and after a power loss a damaged manifest is
    detected at open (and ``GalleryIndex`` rebuilds); an fsync per add would cost more than the add."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    tmp.replace(path)


class DiskIndex:
    """Inner-product search over L2-normalised vectors keyed by int64 ids, stored in a folder.

    Example:
        >>> index = DiskIndex.create("faces.idx", dim=512)
        >>> index.add(ids, vectors)                    # appended to disk at once
        >>> scores, found = index.search(queries, k=5)
        >>> index.close()                              # saves the PQ codes; reopen in milliseconds
        >>> index = DiskIndex.open("faces.idx")

    Adding an id that is present replaces its vector (an unchanged vector is skipped).
    Not safe for concurrent writers: one process owns an index folder.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], config: DiskIndexConfig) -> None:
        self.path = path
        self.config = config
        self.dim = int(manifest["dim"])
        self._manifest = manifest
        self._lookup: dict[int, int] | None = None  # id -> row, built on first need (not for search)
        self._ids = np.zeros(0, np.int64)  # row -> id (-1 dead), with spare capacity past _rows
        self._rows = 0
        self._dead = 0
        self._vectors: np.ndarray = np.zeros((0, self.dim), np.float16)
        self._stage: Stage = _STAGES["flat"](self.dim, config)
        self._saved_rows = 0  # rows covered by the stage files on disk
        self.encoded_at_open = 0  # rows the candidate stage had to (re)encode when opening

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path: str | Path, dim: int, config: DiskIndexConfig | None = None) -> DiskIndex:
        """Make an empty index in a new (or empty) folder ``path``."""
        config = config or DiskIndexConfig()
        path = Path(path)
        if dim < 1:
            raise ValueError(f"index dimension must be positive, got {dim}")
        if config.kind == "pq" and dim % config.pq_m:
            raise ValueError(f"DiskIndexConfig.pq_m={config.pq_m} must divide the dimension {dim}")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path}: exists and is not an empty folder; refusing to write an index there")
        path.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, "dim": dim, "config": asdict(config), "rows": 0,
                    "generation": 0, "files": {"vectors": "vectors.0.f16", "ids": "ids.0.i64"},
                    "stage": "flat", "stage_files": [], "stage_rows": 0, "source": {}}
        for name in manifest["files"].values():
            (path / name).touch()
        _write_json_atomic(path / MANIFEST, manifest)
        return cls.open(path, config)

    @classmethod
    def build(cls, path: str | Path, dim: int, batches: Iterable[tuple[np.ndarray, np.ndarray]],
              config: DiskIndexConfig | None = None) -> DiskIndex:
        """Create an index from (ids (N,), vectors (N, dim)) batches, e.g. ``read_parquet_vectors``."""
        index = cls.create(path, dim, config)
        for ids, vectors in batches:
            index.add(ids, vectors, _save_manifest=False)
        index.save()
        return index

    @classmethod
    def open(cls, path: str | Path, config: DiskIndexConfig | None = None) -> DiskIndex:
        """Memory-map an index folder. ``config`` overrides the query knobs saved with it.

        Raises ``IndexFileError`` naming the file when the folder holds no index, a foreign one,
        or a damaged one; nothing on disk is changed in that case.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        saved = DiskIndexConfig(**manifest["config"])
        config = config or saved
        if config.pq_m != saved.pq_m and manifest["stage"] == "pq":
            config = DiskIndexConfig(**{**asdict(config), "pq_m": saved.pq_m})  # codes were made with it
        index = cls(path, manifest, config)
        index._load_rows()
        index._load_stage()
        return index

    def _file(self, key: str) -> Path:
        return self.path / self._manifest["files"][key]

    def _load_rows(self) -> None:
        rows = int(self._manifest["rows"])
        ids_file, vec_file = self._file("ids"), self._file("vectors")
        row_bytes = {ids_file: 8, vec_file: 2 * self.dim}
        for f, size in row_bytes.items():
            if not f.is_file():
                raise IndexFileError(f, f"missing (the manifest lists {rows} rows in it)")
            have = f.stat().st_size
            if have < rows * size:
                raise IndexFileError(f, f"holds {have // size} rows, the manifest says {rows}: the file was truncated")
            if have > rows * size:  # an append that crashed before the manifest was replaced: drop it
                os.truncate(f, rows * size)
        ids = np.fromfile(ids_file, np.int64, count=rows)
        self._ids = ids
        self._rows = rows
        self._dead = int((ids < 0).sum())
        self._map_vectors()

    def _map_vectors(self) -> None:
        if self._rows:
            mapped = np.memmap(self._file("vectors"), np.float16, mode="r", shape=(self._rows, self.dim))
            # A query reads a few hundred scattered rows: without this hint each page fault on a part
            # of the file not in the page cache also reads ~128 KiB around it (read-ahead).
            advise = getattr(mapped._mmap, "madvise", None)
            if advise is not None and hasattr(mmap, "MADV_RANDOM"):
                advise(mmap.MADV_RANDOM)
            self._vectors = mapped.view(np.ndarray)  # same memory; skips np.memmap's slower __getitem__
        else:
            self._vectors = np.zeros((0, self.dim), np.float16)

    def _load_stage(self) -> None:
        kind = self._manifest["stage"]
        if kind not in _STAGES:
            raise IndexFileError(self.path / MANIFEST,
                                 f"unknown search stage {kind!r}; expected one of {list_stages()}")
        stage = _STAGES[kind](self.dim, self.config)
        covered = 0
        if self._manifest["stage_files"]:
            try:
                saved_upto = stage.load(self.path / f"coarse.{self._manifest['generation']}")
                covered = int(self._manifest["stage_rows"])
                if not saved_upto <= covered <= self._rows:
                    raise IndexFileError(self.path / self._manifest["stage_files"][0],
                                         f"covers rows up to {saved_upto}, the manifest says {covered} of {self._rows}")
            except IndexFileError as exc:  # the rows are the truth: re-encode them instead of failing
                _log.warning("%s; re-encoding the index's vectors", exc)
                covered = 0
        if covered == 0:
            stage = _STAGES[kind](self.dim, self.config)
            if kind != "flat":
                stage.train(self._training_sample())
        self._stage = stage
        self._saved_rows = covered
        self.encoded_at_open = self._rows - covered
        self._encode_rows(covered, self._rows)
        if covered:
            self._stage_forget_dead()

    def _stage_forget_dead(self) -> None:
        if isinstance(self._stage, PQFastScanStage):
            self._stage.purge(self._ids[: self._rows] >= 0)

    def _encode_rows(self, start: int, stop: int, chunk: int = 65_536) -> None:
        """Feed rows [start, stop) that are alive to the candidate stage, a chunk at a time."""
        for lo in range(start, stop, chunk):
            hi = min(stop, lo + chunk)
            rows = lo + np.flatnonzero(self._ids[lo:hi] >= 0)
            if len(rows):
                self._stage.add(rows, _widen(np.asarray(self._vectors[rows])))

    def _training_sample(self) -> np.ndarray:
        alive = np.flatnonzero(self._ids[: self._rows] >= 0)
        if len(alive) > self.config.train_size:
            alive = np.sort(np.random.default_rng(0).choice(alive, self.config.train_size, replace=False))
        if len(alive) == 0:
            raise ValueError("cannot train a PQ stage on an empty index; add vectors first")
        return _widen(np.asarray(self._vectors[alive]))

    # ---------------------------------------------------------------- properties
    def __len__(self) -> int:
        return self._rows - self._dead

    @property
    def stage(self) -> str:
        """Name of the candidate stage in use (``flat`` or ``pq``)."""
        return self._manifest["stage"]

    @property
    def source(self) -> dict[str, Any]:
        """Opaque state saved in the manifest by whoever keeps this index in sync (a copy)."""
        return json.loads(json.dumps(self._manifest.get("source", {})))

    def set_source(self, state: dict[str, Any]) -> None:
        self._manifest["source"] = json.loads(json.dumps(state))
        self._write_manifest()

    def set_rerank(self, rerank: int) -> None:
        """Candidates re-scored exactly per query from now on (the recall/latency knob; no rebuild)."""
        self._set_knob(rerank=rerank)

    def set_scan_threads(self, threads: int) -> None:
        """Threads that scan the PQ codes of one search from now on (``DiskIndexConfig.scan_threads``)."""
        self._set_knob(scan_threads=threads)

    def _set_knob(self, **knob: int) -> None:
        self.config = DiskIndexConfig(**{**asdict(self.config), **knob})
        self._stage.config = self.config

    def ids(self) -> np.ndarray:
        """Ids currently stored (unordered)."""
        ids = self._ids[: self._rows]
        return ids[ids >= 0].copy()

    # ---------------------------------------------------------------- changes
    def _check(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (N, {self.dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or infinity")
        return vectors

    def _row_of(self) -> dict[int, int]:
        if self._lookup is None:
            live = np.flatnonzero(self._ids[: self._rows] >= 0)
            self._lookup = dict(zip(self._ids[live].tolist(), live.tolist()))
        return self._lookup

    def add(self, ids: np.ndarray, vectors: np.ndarray, *, _save_manifest: bool = True) -> int:
        """Append (or replace) ``vectors`` (N, dim) under ``ids`` (N,); returns how many rows were written."""
        vectors = self._check(vectors)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids passed to one add() call must be unique")
        if (ids < 0).any():
            raise ValueError(f"ids must be >= 0 (-1 marks deleted rows), got {ids[ids < 0][:5].tolist()}")
        half = vectors.astype(np.float16)
        lookup = self._row_of()
        rows = np.fromiter((lookup.get(i, -1) for i in ids.tolist()), np.int64, len(ids))
        present = np.flatnonzero(rows >= 0)
        keep = np.ones(len(ids), bool)
        if len(present):
            same = (np.asarray(self._vectors[rows[present]]) == half[present]).all(axis=1)
            keep[present[same]] = False  # the same vector is already stored: nothing to do
            if not same.all():
                self.remove(ids[present[~same]], _save_manifest=False)
        ids, half = ids[keep], half[keep]
        if len(ids):
            self._append(ids, half)
            if self.config.stage_for(len(self), self.dim) != self.stage:
                self._switch_stage(self.config.stage_for(len(self), self.dim))
        if _save_manifest:
            self._write_manifest()
        return len(ids)

    def _append(self, ids: np.ndarray, half: np.ndarray) -> None:
        start = self._rows
        with open(self._file("vectors"), "ab") as f:
            f.write(np.ascontiguousarray(half).tobytes())
        with open(self._file("ids"), "ab") as f:
            f.write(ids.astype("<i8").tobytes())
        need = start + len(ids)
        if need > len(self._ids):  # spare capacity so single-row adds do not copy all ids each time
            grown = np.full(max(need, 2 * len(self._ids), 1024), -1, np.int64)
            grown[:start] = self._ids[:start]
            self._ids = grown
        self._ids[start:need] = ids
        self._rows = need
        if self._lookup is not None:
            self._lookup.update(zip(ids.tolist(), range(start, need)))
        self._map_vectors()
        self._stage.add(np.arange(start, need), half.astype(np.float32))

    def remove(self, ids: np.ndarray, *, _save_manifest: bool = True) -> int:
        """Delete ``ids`` (unknown ids are ignored); returns how many were present."""
        lookup = self._row_of()
        rows = sorted(r for r in (lookup.pop(int(i), None) for i in np.asarray(ids).reshape(-1)) if r is not None)
        if not rows:
            return 0
        tomb = np.int64(-1).astype("<i8").tobytes()
        with open(self._file("ids"), "r+b") as f:
            for row in rows:
                f.seek(8 * row)
                f.write(tomb)
        # A deleted face must not stay readable in the file until the next compaction: zero its vector.
        zeros = bytes(2 * self.dim)
        with open(self._file("vectors"), "r+b") as f:
            for row in rows:
                f.seek(2 * self.dim * row)
                f.write(zeros)
        self._ids[rows] = -1
        self._dead += len(rows)
        alive = self._ids[: self._rows] >= 0
        for _ in rows:
            self._stage.forget(alive)
        if self._dead > self.config.compact_ratio * self._rows and self._rows > 64:
            self.compact()
        elif _save_manifest:
            self._write_manifest()
        return len(rows)

    def _switch_stage(self, kind: str) -> None:
        stage = _STAGES[kind](self.dim, self.config)
        self._stage = stage
        self._manifest["stage"] = kind
        self._manifest["stage_files"], self._manifest["stage_rows"], self._saved_rows = [], 0, 0
        if kind != "flat":
            stage.train(self._training_sample())
        self._encode_rows(0, self._rows)
        self.save()

    def compact(self) -> None:
        """Rewrite the files without the deleted rows (new generation; the old files go after the switch)."""
        gen = int(self._manifest["generation"]) + 1
        files = {"vectors": f"vectors.{gen}.f16", "ids": f"ids.{gen}.i64"}
        live = np.flatnonzero(self._ids[: self._rows] >= 0)
        with open(self.path / files["vectors"], "wb") as fv, open(self.path / files["ids"], "wb") as fi:
            for lo in range(0, len(live), 65_536):
                part = live[lo : lo + 65_536]
                fv.write(np.ascontiguousarray(self._vectors[part]).tobytes())
                fi.write(self._ids[part].astype("<i8").tobytes())
        old = self._current_files()
        self._manifest.update(generation=gen, files=files, rows=len(live))
        self._ids = self._ids[live].copy()
        self._rows, self._dead, self._lookup = len(live), 0, None
        self._map_vectors()
        self._stage.renumber(live)
        self._manifest["stage_files"], self._manifest["stage_rows"] = [], 0
        self.save()  # writes the manifest that switches to the new files
        self._remove_files(old - self._current_files())

    def _current_files(self) -> set[str]:
        return set(self._manifest["files"].values()) | set(self._manifest["stage_files"])

    def _remove_files(self, names: set[str]) -> None:
        for name in names:
            (self.path / name).unlink(missing_ok=True)

    def save(self) -> None:
        """Write the candidate stage's state, so the next open re-encodes nothing."""
        if isinstance(self._stage, PQFastScanStage):
            self._stage.purge(self._ids[: self._rows] >= 0)
        old = set(self._manifest["stage_files"])
        gen = int(self._manifest["generation"])
        prefix = self.path / f"coarse.{gen}"
        # Write the stage beside the old files under a temporary prefix, then rename: a crash leaves the old.
        tmp_prefix = self.path / f"coarse.{gen}.part"
        tmp_names = self._stage.save(tmp_prefix)
        names = []
        for tmp in tmp_names:
            final = tmp.replace(tmp_prefix.name, prefix.name, 1)
            (self.path / tmp).replace(self.path / final)
            names.append(final)
        self._manifest["stage_files"], self._manifest["stage_rows"] = names, self._rows
        self._saved_rows = self._rows
        self._write_manifest()
        self._remove_files(old - set(names))

    def _write_manifest(self) -> None:
        self._manifest["rows"] = self._rows
        self._manifest["config"] = asdict(self.config)
        _write_json_atomic(self.path / MANIFEST, self._manifest)

    def close(self) -> None:
        """Save the candidate stage if rows were added since it was last saved."""
        if self._saved_rows != self._rows or isinstance(self._stage, PQFastScanStage) and self._stage._pending_dead:
            self.save()

    def __enter__(self) -> DiskIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query: (scores (Q, k) float32 descending, ids (Q, k) int64), -inf/-1 padded.

        Candidates from the stage are re-scored exactly against the stored vectors, so the scores
        are true cosines (to float16 precision of the stored vectors, ~1e-3).
        """
        queries = self._check(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_i = np.full((len(queries), k), -1, np.int64)
        if len(self) == 0:
            return out_s, out_i
        # No (rows,)-sized temporaries here: at 10M rows one would cost more than the whole query.
        cand = self._stage.candidates(queries, k, self._ids)  # (Q, C) rows, -1 padded
        ok = cand >= 0
        ok[ok] = self._ids[cand[ok]] >= 0
        rows = np.where(ok, cand, 0)
        exact = np.full(cand.shape, -np.inf, np.float32)
        for qi in range(len(queries)):  # per query: one gather in file order, one matrix-vector product
            cols = np.flatnonzero(ok[qi])
            if len(cols):
                cols = cols[np.argsort(cand[qi, cols])]
                exact[qi, cols] = _widen(np.asarray(self._vectors[cand[qi, cols]])) @ queries[qi]  # (C,)
        top = _top_k(exact, k)
        got = top.shape[1]
        row = np.arange(len(queries))[:, None]
        out_s[:, :got] = exact[row, top]
        found = self._ids[rows[row, top]]
        out_i[:, :got] = np.where(np.isfinite(out_s[:, :got]), found, -1)
        return out_s, out_i


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not path.exists():
        raise IndexFileError(path, "no index here (the folder does not exist)")
    if not path.is_dir():
        raise IndexFileError(path, "not an index folder (it is a file; an index is a folder with a manifest.json)")
    if not manifest_path.is_file():
        raise IndexFileError(manifest_path, "missing: this folder holds no lvface-mm disk index")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFileError(manifest_path, f"unreadable ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise IndexFileError(manifest_path, f"format {found!r}, expected {FORMAT!r}: not an lvface-mm disk index")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise IndexFileError(manifest_path, f"version {manifest.get('version')!r} is newer than this library reads "
                                            f"({VERSION}); upgrade lvface-mm or rebuild the index")
    required = ("dim", "config", "rows", "generation", "files", "stage", "stage_files", "stage_rows")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise IndexFileError(manifest_path, f"damaged: missing fields {missing}")
    try:
        DiskIndexConfig(**manifest["config"])
    except (TypeError, ValueError) as exc:
        raise IndexFileError(manifest_path, f"damaged configuration ({exc})") from exc
    return manifest
