"""Face training sets stored as RecordIO: the InsightFace layout on top of the container, and a
torch Dataset over it.

InsightFace layout (MS1MV2/V3, Glint360K, WebFace, and what `lvface-mm pack` writes):
    key 0          meta record: vector label [a, b], no image
    keys 1..a-1    images, grouped by identity; label = class id (scalar, or vector whose first
                   element is the class id)
    keys a..b-1    one identity record per class: vector label [first image key, end image key)

Files without the meta record (mxnet's im2rec) are plain: every indexed record is an image.

The InsightFace layout stores keys in float32 labels, which are exact only below 2**24
(16,777,216); readers trust them as written and the packer refuses to write beyond that.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ..models.data_config import normalize_crops
from .recordio import IRHeader, RecordIOError, RecordReader, unpack

Layout = Literal["auto", "insightface", "plain"]
FLOAT32_EXACT_LIMIT = 1 << 24  # largest integer range a float32 label holds exactly


@dataclass(frozen=True)
class RecordLayout:
    """Which keys of a `.rec` are images, and how they group into identities.

    Attributes:
        image_keys: (N,) int64 keys of image records, in sample order.
        identity_keys: (C,) int64 keys of the identity records (InsightFace layout), else empty.
        kind: "insightface" or "plain".
    """

    image_keys: np.ndarray
    identity_keys: np.ndarray
    kind: Literal["insightface", "plain"]

    @property
    def num_images(self) -> int:
        return len(self.image_keys)


def meta_record_range(payload: bytes) -> tuple[int, int] | None:
    """(a, b) if `payload` is an InsightFace meta record: a vector label [a, b] and no image bytes."""
    header, rest = unpack(payload, source="record 0")
    if header.flag < 2 or rest:
        return None
    a, b = header.label[0], header.label[1]
    if a != int(a) or b != int(b) or not 1 <= a <= b:
        return None
    return int(a), int(b)


def read_layout(reader: RecordReader, layout: Layout = "auto") -> RecordLayout:
    """Find the image and identity keys of an indexed `.rec`.

    Args:
        reader: an indexed reader.
        layout: "auto" detects the InsightFace meta record at key 0; "insightface" requires it;
            "plain" treats every record as an image.

    Raises:
        RecordIOError: "insightface" requested but key 0 is not a meta record, or the meta record
            names keys the index does not have.
    """
    if reader.keys is None:
        raise RecordIOError(f"{reader.rec_path}: a dataset needs the .idx file next to it")
    if layout not in ("auto", "insightface", "plain"):
        raise ValueError(f"layout must be 'auto', 'insightface' or 'plain', got {layout!r}")
    meta = meta_record_range(reader.read(0)) if layout != "plain" and 0 in reader else None
    if meta is None:
        if layout == "insightface":
            raise RecordIOError(
                f"{reader.rec_path}: key 0 is not an InsightFace meta record (vector label [a, b], no image)"
            )
        return RecordLayout(np.sort(reader.keys), np.zeros(0, dtype=np.int64), "plain")
    a, b = meta
    image_keys = np.arange(1, a, dtype=np.int64)
    identity_keys = np.arange(a, b, dtype=np.int64)
    wanted = np.concatenate([image_keys, identity_keys])
    known = reader.slots_of(wanted, strict=False) >= 0
    if not known.all():
        missing = int(wanted[~known][0])
        raise RecordIOError(
            f"{reader.rec_path}: the meta record says images are keys 1..{a - 1} and identities {a}..{b - 1}, "
            f"but key {missing} is not in {reader.idx_path}"
        )
    return RecordLayout(image_keys, identity_keys, "insightface")


class RecordDataset(Dataset):
    """Aligned face crops from a `.rec`/`.idx` pair, as the encoder takes them.

    Map-style, so `DistributedSampler` and any other index sampler work; safe to pickle into
    DataLoader workers (each opens its own descriptor).

    Args:
        path: directory with `train.rec`/`train.idx`, a `.rec`/`.idx` path, or a prefix.
        layout: see `read_layout`.
        random_flip: flip horizontally with probability 0.5 (the arcface_torch training augmentation).
        image_size: expected crop side; other sizes are an error, not silently resized, because a
            wrong size usually means unaligned data.

    Items are `(image, label)`: image (3, S, S) float32 RGB in [-1, 1] ((x / 255 - 0.5) / 0.5),
    label a 0-d int64 tensor.
    """

    def __init__(
        self,
        path: str | Path,
        layout: Layout = "auto",
        random_flip: bool = False,
        image_size: int = 112,
    ) -> None:
        self.reader = RecordReader.open(path)
        self.layout = read_layout(self.reader, layout)
        self.random_flip = random_flip
        self.image_size = image_size

    def __len__(self) -> int:
        return self.layout.num_images

    def key(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.reader.rec_path}")
        return int(self.layout.image_keys[index])

    def read_header(self, index: int) -> tuple[IRHeader, bytes]:
        """(IR header, encoded image bytes) of image `index`."""
        key = self.key(index)
        return unpack(self.reader.read(key), source=f"{self.reader.rec_path} key {key}")

    def read_image(self, index: int) -> tuple[np.ndarray, int]:
        """Image `index` as (H, W, 3) uint8 RGB and its class id."""
        header, data = self.read_header(index)
        source = f"{self.reader.rec_path} key {self.key(index)}"
        image = decode_image(data, source)
        if image.shape[:2] != (self.image_size, self.image_size):
            raise ValueError(
                f"{source}: image is {image.shape[1]}x{image.shape[0]}, expected an aligned "
                f"{self.image_size}x{self.image_size} crop"
            )
        return image, header.class_id

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.read_image(index)
        if self.random_flip and torch.rand(()) < 0.5:
            image = image[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # (3, H, W) uint8
        return normalize_crops(x), torch.tensor(label, dtype=torch.int64)

    def labels(self) -> np.ndarray:
        """(N,) int64 class id of every image, read from headers only (fast; for samplers)."""
        table = self.reader.read_headers(self.layout.image_keys)
        return table.label.astype(np.int64)

    @cached_property
    def num_classes(self) -> int:
        """Identity records in the InsightFace layout, else 1 + the largest label."""
        if self.layout.kind == "insightface" and len(self.layout.identity_keys):
            return len(self.layout.identity_keys)
        labels = self.labels()
        return int(labels.max()) + 1 if len(labels) else 0

    def identity_ranges(self) -> np.ndarray:
        """(C, 2) int64 [first, end) image keys per class, from the identity records."""
        if self.layout.kind != "insightface":
            raise RecordIOError(f"{self.reader.rec_path} has no identity records (not the InsightFace layout)")
        ranges = np.zeros((len(self.layout.identity_keys), 2), dtype=np.int64)
        for i, key in enumerate(self.layout.identity_keys.tolist()):
            header, _ = unpack(self.reader.read(key), source=f"{self.reader.rec_path} key {key}")
            if header.flag < 2:
                raise RecordIOError(f"{self.reader.rec_path} key {key}: identity record without a [first, end) label")
            ranges[i] = header.label[0], header.label[1]
        return ranges


def decode_image(data: bytes, source: str) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> (H, W, 3) uint8 RGB, with a clear error if unreadable."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise ValueError(f"{source}: {len(data)} bytes are not a decodable image")
    return np.ascontiguousarray(image[:, :, ::-1])  # BGR -> RGB
