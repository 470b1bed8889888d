"""Batched embedding extraction for evaluation: original + flipped view, resumable, cached on disk.

An IJB-C run embeds ~470k faces twice; a crash or Ctrl-C at 90% should not cost the first 90%.
Embeddings are written into a float32 `.npy` as they are computed; a small JSON file next to it
records how many rows are done and what produced them (a key built from the model weights and the
data). A second call with the same key resumes after the last finished row, or returns at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..faces.alignment import to_model_input
from ..models.checkpoint import weights_fingerprint


@dataclass(frozen=True)
class Embeddings:
    """Raw (un-normalised) embeddings of N images.

    Attributes:
        plain: (N, D) float32 embeddings of the images (possibly a strided view).
        flipped: (N, D) float32 embeddings of the horizontally flipped images, or None.
    """

    plain: np.ndarray
    flipped: np.ndarray | None


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the architecture and every parameter/buffer value (cache key for the weights)."""
    return weights_fingerprint(model)[:16]


def _collate(batch: list[np.ndarray]) -> np.ndarray:
    return np.stack(batch)  # (B, H, W, 3) uint8


@torch.inference_mode()
def _embed(model: nn.Module, crops: np.ndarray, flip: bool, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray | None]:
    param = next(model.parameters())
    x = to_model_input(crops, device=param.device, dtype=dtype)  # (B, 3, H, W) in [-1, 1]
    plain = model(x).float().cpu().numpy()  # (B, D)
    flipped = model(torch.flip(x, dims=[3])).float().cpu().numpy() if flip else None
    return plain, flipped


def extract_embeddings(
    model: nn.Module,
    images: Dataset | Sequence[np.ndarray],
    *,
    batch_size: int = 128,
    flip: bool = True,
    cache_path: str | Path | None = None,
    cache_key: str = "",
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "embed",
) -> Embeddings:
    """Embed aligned crops in batches, optionally caching/resuming through `cache_path`.

    Args:
        model: the encoder; it runs on the device and in the dtype of its parameters, in eval mode
            (restored afterwards).
        images: map-style dataset or sequence whose items are (112, 112, 3) uint8 RGB crops.
        batch_size: images per forward pass.
        flip: also embed the horizontally flipped crops.
        cache_path: `.npy` file for the embeddings (a `.json` sidecar holds progress); None keeps
            everything in memory.
        cache_key: identifies model and data; a cache with another key is recomputed, never reused.
        num_workers: DataLoader workers decoding/aligning images.
        progress: show a progress bar.
        desc: progress bar label.
    """
    from tqdm.auto import tqdm

    n = len(images)
    if n == 0:
        raise ValueError("no images to embed")
    views = 2 if flip else 1
    param = next(model.parameters())
    key = f"{cache_key}|views={views}|dtype={param.dtype}"
    store = _CacheStore(Path(cache_path), key, n, views) if cache_path is not None else None
    start = store.done if store is not None else 0
    out = store.array if store is not None and store.array is not None else None
    was_training = model.training
    model.eval()
    try:
        if start < n:
            loader = DataLoader(
                Subset(images, range(start, n)),
                batch_size=batch_size,
                shuffle=False,
                num_workers=num_workers,
                collate_fn=_collate,
            )
            bar = tqdm(total=n, initial=start, desc=desc, unit="img", disable=not progress)
            pos = start
            for crops in loader:
                plain, flipped = _embed(model, crops, flip, param.dtype)
                if out is None:
                    shape = (n, views, plain.shape[1])
                    out = store.create(shape) if store is not None else np.zeros(shape, dtype=np.float32)
                out[pos : pos + len(plain), 0] = plain
                if flipped is not None:
                    out[pos : pos + len(plain), 1] = flipped
                pos += len(plain)
                if store is not None:
                    store.commit(pos)
                bar.update(len(plain))
            bar.close()
    finally:
        model.train(was_training)
    if store is not None:  # read the cache into memory: a later run may rewrite the file under a view
        out = np.array(out)
    return Embeddings(out[:, 0], out[:, 1] if flip else None)  # views: no second copy of the embeddings


class _CacheStore:
    """`<name>.npy` (N, views, D) float32 memmap + `<name>.json` {key, rows, done}.

    The JSON is replaced atomically after the rows it counts are flushed, so `done` never claims
    rows that are not on disk.
    """

    def __init__(self, path: Path, key: str, rows: int, views: int) -> None:
        self.path = path if path.suffix == ".npy" else path.with_name(path.name + ".npy")
        self.meta_path = self.path.with_suffix(".json")
        self.key, self.rows, self.views = key, rows, views
        self.done = 0
        self.array: np.memmap | None = None
        meta = self._read_meta()
        if meta is not None and meta.get("key") == key and meta.get("rows") == rows and self.path.is_file():
            try:
                array = np.load(self.path, mmap_mode="r+")
            except (OSError, ValueError):
                array = None
            if array is not None and array.shape[:2] == (rows, views):
                self.array, self.done = array, int(meta.get("done", 0))

    def _read_meta(self) -> dict[str, object] | None:
        try:
            return json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def create(self, shape: tuple[int, int, int]) -> np.memmap:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=shape)
        self.done = 0
        self._write_meta()
        return self.array

    def commit(self, done: int) -> None:
        self.array.flush()
        self.done = done
        self._write_meta()

    def _write_meta(self) -> None:
        tmp = self.meta_path.with_name(self.meta_path.name + ".partial")
        tmp.write_text(json.dumps({"key": self.key, "rows": self.rows, "done": self.done}), encoding="utf-8")
        os.replace(tmp, self.meta_path)
