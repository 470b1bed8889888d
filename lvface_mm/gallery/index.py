"""Nearest-neighbour search over L2-normalised vectors, by inner product (= cosine).

One small interface, several backends chosen by name from a registry:

- ``exact``: numpy matrix product + partial sort. No extra dependency, exact, and fast enough
  for small galleries (see benchmarks/results/gallery_and_demo.md for where it stops being so).
- ``flat``: FAISS ``IndexFlatIP``, exact too, but multi-threaded BLAS with less Python overhead.
- ``ivf``: FAISS ``IndexIVFFlat``, approximate; trains its coarse quantizer once enough vectors
  arrived and serves exact results until then.
- ``hnsw``: FAISS ``IndexHNSWFlat``, approximate, no training; deletes are tombstoned and the
  graph rebuilt once too many accumulate, because HNSW cannot remove nodes.
- ``auto`` (the default): ``exact`` while small, rebuilt into ``auto_kind`` once past ``exact_below``
  vectors. ``auto_kind`` defaults to ``flat``, so the default never trades recall for speed: on
  the benchmark's uniform-sphere galleries HNSW (M 32, efSearch 128) found the exact top-1 for
  92.5% of queries at 100k and IVF less; choose them explicitly when that trade is wanted.

Every backend keys vectors by caller-chosen int64 ids (gallery identity ids, face row ids), so
adding an id that is already present replaces its vector.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ExactIndex",
    "IndexConfig",
    "VectorIndex",
    "create_index",
    "faiss_available",
    "list_indexes",
    "register_index",
]


@dataclass(frozen=True)
class IndexConfig:
    """Which backend to build and how to tune the approximate ones.

    Attributes:
        kind: a registered backend name (``list_indexes()``).
        exact_below: for ``auto``, the size up to which the numpy index is used.
        auto_kind: for ``auto``, the backend used past ``exact_below``.
        nlist: IVF cells; None picks ~4*sqrt(N) at training time.
        nprobe: IVF cells visited per query (recall/latency knob).
        hnsw_m: HNSW graph degree.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW query-time beam width (recall/latency knob).
    """

    kind: str = "auto"
    exact_below: int = 50_000
    auto_kind: str = "flat"
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128

    def __post_init__(self) -> None:
        if self.kind not in _INDEXES:
            raise ValueError(f"IndexConfig.kind={self.kind!r}: expected one of {list_indexes()}")
        if self.auto_kind not in _INDEXES or self.auto_kind == "auto":
            raise ValueError(f"IndexConfig.auto_kind={self.auto_kind!r}: expected a concrete backend")
        for field in ("exact_below", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"IndexConfig.{field}={getattr(self, field)!r}: expected a positive integer")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"IndexConfig.nlist={self.nlist!r}: expected None or a positive integer")


class VectorIndex(ABC):
    """Inner-product search keyed by int64 ids. Vectors are expected L2-normalised."""

    def __init__(self, dim: int, config: IndexConfig) -> None:
        if dim < 1:
            raise ValueError(f"index dimension must be positive, got {dim}")
        self.dim = dim
        self.config = config

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert (or replace, for ids already present) ``vectors`` (N, dim) under ``ids`` (N,)."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> None:
        """Drop ``ids``; unknown ids are ignored."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query: (scores (Q, k) float32 descending, ids (Q, k) int64).

        Rows with fewer than ``k`` results are padded with score -inf and id -1.
        """

    @abstractmethod
    def __len__(self) -> int: ...

    def _check(self, ids: np.ndarray | None, vectors: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (N, {self.dim}), got {vectors.shape}")
        if ids is not None:
            ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
            if len(ids) != len(vectors):
                raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
            if len(np.unique(ids)) != len(ids):
                raise ValueError("ids passed to one add() call must be unique")
        return ids, vectors


_INDEXES: dict[str, Callable[[int, IndexConfig], VectorIndex]] = {}


def register_index(name: str) -> Callable[[type[VectorIndex]], type[VectorIndex]]:
    """Class decorator: make a backend available to ``create_index(name)``."""

    def wrap(cls: type[VectorIndex]) -> type[VectorIndex]:
        if name in _INDEXES:
            raise ValueError(f"index backend {name!r} is already registered")
        _INDEXES[name] = cls
        return cls

    return wrap


def list_indexes() -> list[str]:
    return sorted(_INDEXES)


def create_index(dim: int, config: IndexConfig | str = "auto") -> VectorIndex:
    """Build an empty index. ``config`` is an ``IndexConfig`` or just a backend name."""
    if isinstance(config, str):
        config = IndexConfig(kind=config)
    return _INDEXES[config.kind](dim, config)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _import_faiss():  # noqa: ANN202 - the module type is faiss's own
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "FAISS index backends need `pip install faiss-cpu` (or `pip install lvface-mm[demo]`); "
            "the 'exact' backend works without it"
        ) from exc
    return faiss


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad result columns to ``k`` with (-inf, -1)."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores[:, :k], ids[:, :k]
    q = scores.shape[0]
    return (
        np.concatenate([scores, np.full((q, missing), -np.inf, np.float32)], axis=1),
        np.concatenate([ids, np.full((q, missing), -1, np.int64)], axis=1),
    )


@register_index("exact")
class ExactIndex(VectorIndex):
    """Brute force in numpy. Rows live in one growing array; a removal moves the last row into the hole."""

    # Bound the (queries x rows) score matrix so a big batch against a big gallery stays in memory.
    _max_scores_per_chunk = 1 << 24

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        super().__init__(dim, config or IndexConfig(kind="exact"))
        self._vectors = np.zeros((0, dim), np.float32)
        self._ids = np.zeros(0, np.int64)
        self._size = 0
        self._row_of: dict[int, int] = {}

    def __len__(self) -> int:
        return self._size

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = self._check(ids, vectors)
        present = [i for i in ids.tolist() if i in self._row_of]
        if present:
            self.remove(np.asarray(present))
        need = self._size + len(ids)
        if need > len(self._vectors):  # grow geometrically so many small adds stay linear overall
            capacity = max(need, 2 * len(self._vectors), 16)
            grown = np.zeros((capacity, self.dim), np.float32)
            grown[: self._size] = self._vectors[: self._size]
            grown_ids = np.zeros(capacity, np.int64)
            grown_ids[: self._size] = self._ids[: self._size]
            self._vectors, self._ids = grown, grown_ids
        self._vectors[self._size : need] = vectors
        self._ids[self._size : need] = ids
        for offset, i in enumerate(ids.tolist()):
            self._row_of[i] = self._size + offset
        self._size = need

    def remove(self, ids: np.ndarray) -> None:
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            row = self._row_of.pop(i, None)
            if row is None:
                continue
            last = self._size - 1
            if row != last:
                self._vectors[row] = self._vectors[last]
                moved = int(self._ids[last])
                self._ids[row] = moved
                self._row_of[moved] = row
            self._size = last

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) currently stored, as views."""
        return self._ids[: self._size], self._vectors[: self._size]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, queries = self._check(None, queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = self._size
        kk = min(k, n)
        out_s = np.empty((len(queries), kk), np.float32)
        out_i = np.empty((len(queries), kk), np.int64)
        if kk > 0:
            step = max(1, self._max_scores_per_chunk // n)
            base = self._vectors[:n]
            for start in range(0, len(queries), step):
                scores = queries[start : start + step] @ base.T
                if kk < n:
                    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
                else:
                    top = np.broadcast_to(np.arange(n), scores.shape).copy()
                top_scores = np.take_along_axis(scores, top, axis=1)
                order = np.argsort(-top_scores, axis=1, kind="stable")
                out_s[start : start + step] = np.take_along_axis(top_scores, order, axis=1)
                out_i[start : start + step] = self._ids[np.take_along_axis(top, order, axis=1)]
        return _pad(out_s, out_i, k)


@register_index("flat")
class FaissFlatIndex(VectorIndex):
    """FAISS exact inner-product search; ids mapped by ``IndexIDMap2`` so removal works."""

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        super().__init__(dim, config or IndexConfig(kind="flat"))
        faiss = _import_faiss()
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = self._check(ids, vectors)
        self.remove(ids)
        self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if len(ids) and len(self):
            faiss = _import_faiss()
            self._index.remove_ids(faiss.IDSelectorBatch(ids))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, queries = self._check(None, queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(self) == 0:
            return _pad(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), k)
        scores, ids = self._index.search(queries, min(k, len(self)))
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return _pad(scores, ids.astype(np.int64), k)


@register_index("ivf")
class FaissIVFIndex(VectorIndex):
    """FAISS ``IndexIVFFlat`` (inner product). Until enough vectors arrived to train the coarse
    quantizer (39 per cell, FAISS's own rule of thumb), vectors sit in an exact buffer."""

    _min_points_per_cell = 39

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        super().__init__(dim, config or IndexConfig(kind="ivf"))
        self._buffer = ExactIndex(dim)
        self._index = None

    def __len__(self) -> int:
        return len(self._buffer) if self._index is None else int(self._index.ntotal)

    @property
    def trained(self) -> bool:
        return self._index is not None

    def set_nprobe(self, nprobe: int) -> None:
        """Cells visited per query from now on: the recall/latency knob, no rebuild needed."""
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.config = IndexConfig(**{**self.config.__dict__, "nprobe": nprobe})
        if self._index is not None:
            self._index.nprobe = min(nprobe, self._index.nlist)

    def _nlist_for(self, n: int) -> int:
        if self.config.nlist is not None:
            return self.config.nlist
        return max(1, min(65536, int(4 * math.sqrt(n))))

    def _maybe_train(self) -> None:
        n = len(self._buffer)
        nlist = self._nlist_for(n)
        if self.config.nlist is None and n < 1000:
            return  # a tiny IVF is all overhead; stay exact
        if n < nlist * self._min_points_per_cell:
            return
        faiss = _import_faiss()
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ids, vectors = self._buffer.vectors()
        index.train(np.ascontiguousarray(vectors))
        index.add_with_ids(np.ascontiguousarray(vectors), np.ascontiguousarray(ids))
        index.nprobe = min(self.config.nprobe, nlist)
        self._index, self._quantizer = index, quantizer  # keep the quantizer alive: FAISS does not own it
        self._buffer = ExactIndex(self.dim)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = self._check(ids, vectors)
        if self._index is None:
            self._buffer.add(ids, vectors)
            self._maybe_train()
        else:
            self.remove(ids)
            self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if self._index is None:
            self._buffer.remove(ids)
        elif len(ids):
            faiss = _import_faiss()
            self._index.remove_ids(faiss.IDSelectorBatch(ids))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, queries = self._check(None, queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._index is None:
            return self._buffer.search(queries, k)
        scores, ids = self._index.search(queries, k)
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids.astype(np.int64)


@register_index("hnsw")
class FaissHNSWIndex(VectorIndex):
    """FAISS ``IndexHNSWFlat`` (inner product). HNSW cannot delete nodes, so removed or replaced
    entries are tombstoned, searched past, and the graph is rebuilt when a quarter is dead."""

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        super().__init__(dim, config or IndexConfig(kind="hnsw"))
        self._reset()

    def _reset(self) -> None:
        faiss = _import_faiss()
        self._index = faiss.IndexHNSWFlat(self.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        self._index.hnsw.efConstruction = self.config.ef_construction
        self._index.hnsw.efSearch = self.config.ef_search
        self._label_ids = np.zeros(0, np.int64)  # internal sequential label -> caller id (-1 = dead)
        self._label_of: dict[int, int] = {}
        self._dead = 0

    def __len__(self) -> int:
        return len(self._label_of)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = self._check(ids, vectors)
        self.remove(ids)
        start = int(self._index.ntotal)
        self._index.add(vectors)
        self._label_ids = np.concatenate([self._label_ids, ids])
        for offset, i in enumerate(ids.tolist()):
            self._label_of[i] = start + offset

    def remove(self, ids: np.ndarray) -> None:
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            label = self._label_of.pop(i, None)
            if label is not None:
                self._label_ids[label] = -1
                self._dead += 1
        if self._dead and self._dead * 4 >= len(self._label_ids):
            self._rebuild()

    def _rebuild(self) -> None:
        alive = np.flatnonzero(self._label_ids >= 0)
        vectors = self._index.reconstruct_n(0, int(self._index.ntotal))[alive] if len(alive) else None
        ids = self._label_ids[alive]
        self._reset()
        if vectors is not None:
            self.add(ids, vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, queries = self._check(None, queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(self) == 0:
            return _pad(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), k)
        # Ask for enough extra neighbours to step over tombstones (bounded by the rebuild rule).
        k_raw = min(int(self._index.ntotal), k + self._dead)
        if self._index.hnsw.efSearch < k_raw:
            self._index.hnsw.efSearch = k_raw
        scores, labels = self._index.search(queries, k_raw)
        ids = np.where(labels >= 0, self._label_ids[np.maximum(labels, 0)], -1)
        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_i = np.full((len(queries), k), -1, np.int64)
        for row in range(len(queries)):
            keep = ids[row] >= 0
            got = min(k, int(keep.sum()))
            out_s[row, :got] = scores[row][keep][:got]
            out_i[row, :got] = ids[row][keep][:got]
        return out_s, out_i


@register_index("auto")
class AutoIndex(VectorIndex):
    """Exact while small; moves everything into ``config.auto_kind`` once past ``exact_below``
    (and only if FAISS is installed, otherwise it stays exact and correct, just slower)."""

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        super().__init__(dim, config or IndexConfig(kind="auto"))
        self._exact: ExactIndex | None = ExactIndex(dim)
        self._inner: VectorIndex = self._exact

    @property
    def backend(self) -> str:
        """Name of the backend currently answering queries."""
        return "exact" if self._exact is not None else self.config.auto_kind

    def __len__(self) -> int:
        return len(self._inner)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._inner.add(ids, vectors)
        if self._exact is not None and len(self._exact) > self.config.exact_below and faiss_available():
            big = _INDEXES[self.config.auto_kind](self.dim, self.config)
            all_ids, all_vectors = self._exact.vectors()
            big.add(all_ids.copy(), all_vectors.copy())
            self._inner, self._exact = big, None

    def remove(self, ids: np.ndarray) -> None:
        self._inner.remove(ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._inner.search(queries, k)
