"""InsightFace verification `.bin` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...): read safely,
decode lazily, write from a pairs list.

Format: a pickle of `(bins, issame_list)`; `bins` holds 2N encoded images (JPEG, sometimes PNG)
and images 2i, 2i+1 form pair i; `issame_list` holds N booleans. Most files were pickled by
Python 2, whose `str` must be read as bytes (`encoding="bytes"`).

A pickle can run arbitrary code when loaded, and these files are passed around the internet, so
the reader allows no global at all: `find_class` refuses every import, which is the only way a
pickle reaches a callable. Lists, tuples, bytes, bools and small ints need no globals. The result
is then checked for the exact expected shape.

What differs from InsightFace's loader and why: images stay encoded in memory and are decoded
when asked for, so LFW + CFP-FP + AgeDB-30 take ~0.2 GB instead of ~11 GB of float tensors.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .record_dataset import decode_image


class UnsafePickleError(pickle.UnpicklingError):
    """The file asked to import something while unpickling; it is refused, nothing ran."""


class _NoGlobalsUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        raise UnsafePickleError(
            f"{self.source}: refusing to load: the pickle asks for {module}.{name}, but a verification .bin "
            "holds only a list of encoded images and a list of booleans (this file may try to run code)"
        )

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(f"{self.source}: refusing to load: the pickle uses persistent ids")


def safe_load_pickle(data: bytes | io.BufferedIOBase, source: str = "<bytes>") -> object:
    """Unpickle `data` (bytes or a binary file) allowing only built-in containers and scalars;
    never imports anything."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        return _NoGlobalsUnpickler(stream, source).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # a truncated or non-pickle file: say so instead of an opcode traceback
        reason = f"{exc.__class__.__name__}: {exc}"
        raise ValueError(f"{source}: not a readable verification .bin pickle ({reason})") from exc


class VerificationBin:
    """The pairs of one verification set, images kept encoded.

    Args:
        images: 2N encoded images; images 2i and 2i+1 form pair i.
        issame: N booleans, True for a genuine pair.
        name: set name for reports (e.g. "lfw").
        image_size: decoded images of another size are resized to this (as InsightFace does).
    """

    def __init__(self, images: Sequence[bytes], issame: Sequence[bool], name: str = "", image_size: int = 112) -> None:
        if len(images) != 2 * len(issame):
            raise ValueError(f"{name or 'verification set'}: {len(images)} images for {len(issame)} pairs "
                             f"(expected {2 * len(issame)})")
        self.images = list(images)
        self.issame = np.asarray(issame, dtype=bool)
        self.name = name
        self.image_size = image_size

    @property
    def num_pairs(self) -> int:
        return len(self.issame)

    def __len__(self) -> int:
        """Number of images (2 per pair)."""
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        """Image `index` decoded to (S, S, 3) uint8 RGB."""
        image = decode_image(self.images[index], f"{self.name or 'verification set'} image {index}")
        if image.shape[:2] != (self.image_size, self.image_size):
            import cv2

            image = cv2.resize(image, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
        return image

    @property
    def encoded_bytes(self) -> int:
        return sum(len(b) for b in self.images)


def load_verification_bin(path: str | Path, image_size: int = 112) -> VerificationBin:
    """Read a `.bin` through the restricted unpickler.

    Raises:
        UnsafePickleError: the file asks to import or call anything (nothing is executed).
        ValueError: the file is not `(list of 2N image bytes, list of N bools)`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification .bin not found: {path}")
    with open(path, "rb") as f:  # unpickle from the stream: the file's bytes are never held twice
        obj = safe_load_pickle(f, str(path))
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (images, issame_list) pair, got {_describe(obj)}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in images):
        raise ValueError(f"{path}: the first element must be a list of encoded image bytes, got {_describe(images)}")
    if not isinstance(issame, (list, tuple)):
        raise ValueError(f"{path}: the second element must be a list of booleans, got {_describe(issame)}")
    bad = next((v for v in issame if not (isinstance(v, bool) or (type(v) is int and v in (0, 1)))), None)
    if bad is not None:
        raise ValueError(f"{path}: the is-same list must hold booleans, found {bad!r}")
    return VerificationBin([bytes(b) for b in images], [bool(v) for v in issame], name=path.stem, image_size=image_size)


def write_verification_bin(
    path: str | Path,
    pairs: Sequence[tuple[bytes | str | Path, bytes | str | Path, bool]],
    overwrite: bool = False,
) -> Path:
    """Write a `.bin` from (image a, image b, is_same) pairs; images as encoded bytes or file paths.

    Files are stored byte for byte (align them first: readers expect 112x112 crops). The pickle
    uses protocol 4, which needs no globals, so `load_verification_bin` (and InsightFace's loader)
    read it.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite {path} (pass overwrite=True)")
    images: list[bytes] = []
    issame: list[bool] = []
    for i, pair in enumerate(pairs):
        if len(pair) != 3:
            raise ValueError(f"pair {i}: expected (image_a, image_b, is_same), got {len(pair)} items")
        a, b, same = pair
        images.extend(_as_bytes(x, f"pair {i}") for x in (a, b))
        issame.append(bool(same))
    if not issame:
        raise ValueError("no pairs to write")
    tmp = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(pickle.dumps((images, issame), protocol=4))
    tmp.replace(path)
    return path


def _as_bytes(image: bytes | str | Path, where: str) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    p = Path(image)
    if not p.is_file():
        raise FileNotFoundError(f"{where}: image file not found: {p}")
    return p.read_bytes()


def _describe(obj: object) -> str:
    if isinstance(obj, (list, tuple)):
        inner = f" of {type(obj[0]).__name__}" if obj else ""
        return f"{type(obj).__name__}[{len(obj)}]{inner}"
    return type(obj).__name__
