"""Pack a folder-per-identity tree into `train.rec`/`train.idx` in the InsightFace layout.

Aligned 112x112 JPEG/PNG files are stored byte for byte (no second JPEG pass); anything else is
decoded, optionally detected and aligned with `lvface_mm.faces`, and encoded as JPEG. Output goes
to `*.partial` files renamed at the end, so an interrupted run leaves earlier packs intact.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .image_folder import IdentityFolder, list_identity_folder
from .record_dataset import FLOAT32_EXACT_LIMIT
from .recordio import IRHeader, RecordWriter, pack

# One image -> encoded bytes, or a reason it was skipped.
Encoder = Callable[[Path], "bytes | str"]


@dataclass(frozen=True)
class PackResult:
    """What `pack_identity_folder` wrote.

    Attributes:
        rec_path / idx_path: the files written.
        num_images: image records written.
        identities: packed identity names; class id = position.
        skipped: (file, reason) for every image left out.
    """

    rec_path: Path
    idx_path: Path
    num_images: int
    identities: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]

    @property
    def num_classes(self) -> int:
        return len(self.identities)


def aligned_encoder(image_size: int = 112, quality: int = 95) -> Encoder:
    """Use already aligned crops as they are: JPEG/PNG bytes unchanged, other formats re-encoded."""

    def encode(path: Path) -> bytes | str:
        from PIL import Image, UnidentifiedImageError

        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                size, fmt = im.size, im.format
        except (UnidentifiedImageError, OSError) as exc:
            return f"not a readable image ({exc.__class__.__name__})"
        if size != (image_size, image_size):
            return f"{size[0]}x{size[1]} is not an aligned {image_size}x{image_size} crop (pack without --aligned)"
        if fmt in ("JPEG", "PNG"):
            return data
        from ..faces.image_io import load_image

        return encode_jpeg(load_image(path).array, quality)

    return encode


def detecting_encoder(detector: object, image_size: int = 112, quality: int = 95) -> Encoder:
    """Detect the largest face, align it to the ArcFace template and encode it as JPEG.

    Args:
        detector: an `lvface_mm.faces` detector (anything with `.detect(rgb) -> [DetectedFace]`).
    """
    from ..faces.alignment import align_face
    from ..faces.image_io import ImageLoadError, load_image

    def encode(path: Path) -> bytes | str:
        try:
            image = load_image(path).array
        except ImageLoadError as exc:
            return exc.reason
        faces = detector.detect(image)
        if not faces:
            if image.shape[:2] == (image_size, image_size):
                return f"no face detected ({image_size}x{image_size}: already aligned? use --aligned)"
            return "no face detected"
        face = max(faces, key=lambda f: f.area)
        return encode_jpeg(align_face(image, face.landmarks, output_size=image_size), quality)

    return encode


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def pack_identity_folder(
    root: str | Path | IdentityFolder,
    output_dir: str | Path,
    encoder: Encoder | None = None,
    *,
    insightface_layout: bool = True,
    overwrite: bool = False,
    workers: int = 4,
    progress: bool = True,
    image_size: int = 112,
) -> PackResult:
    """Write `output_dir/train.rec`, `train.idx`, `property` and `identities.tsv`.

    Args:
        root: a folder-per-identity tree (or its listing).
        output_dir: directory for the outputs (created).
        encoder: path -> encoded crop or skip reason; default `aligned_encoder()`.
        insightface_layout: write the meta record (key 0) and identity records; False writes plain
            im2rec-style files (keys 0..N-1, images only).
        overwrite: replace an existing pack in `output_dir`.
        workers: threads decoding/aligning images (order of the output does not depend on it).
        progress: show a progress bar.
        image_size: crop side written to `property`.

    Raises:
        FileExistsError: outputs exist and `overwrite` is False (checked before any work).
        ValueError: no image could be packed, or the InsightFace layout would need keys beyond
            float32's exact range.
    """
    from tqdm.auto import tqdm

    listing = root if isinstance(root, IdentityFolder) else list_identity_folder(root)
    encoder = encoder or aligned_encoder(image_size)
    if insightface_layout and 1 + len(listing) + listing.num_classes > FLOAT32_EXACT_LIMIT:
        raise ValueError(
            f"{len(listing)} images + {listing.num_classes} identities exceed the {FLOAT32_EXACT_LIMIT:,} keys the "
            "InsightFace layout can address (its labels are float32); pack with the plain layout instead"
        )
    out = Path(output_dir)
    rec_path, idx_path = out / "train.rec", out / "train.idx"
    extras = [out / "property", out / "identities.tsv"]
    if not overwrite:
        existing = [str(p) for p in (rec_path, idx_path, *extras) if p.exists()]
        if existing:
            raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (use overwrite)")
    with (
        tqdm(total=len(listing), desc="pack", unit="img", disable=not progress) as bar,
        ThreadPoolExecutor(max(1, workers)) as pool,
        RecordWriter(rec_path, idx_path, overwrite=overwrite) as writer,
    ):
        first_key = 0
        if insightface_layout:
            writer.write(pack(IRHeader((0.0, 0.0)), b""), key=0)  # placeholder, rewritten below
            first_key = 1
        encoded = _ordered_map(pool, _safe(encoder), (path for path, _ in listing.samples), window=8 * max(1, workers))
        ranges, packed, skipped = _write_identities(writer, listing, encoded, first_key, bar)
        if not ranges:
            raise ValueError(f"{listing.root}: none of {len(listing)} images could be packed; first problem: "
                             f"{skipped[0][0]}: {skipped[0][1]}")
        key = ranges[-1][1]
        num_images = key - first_key
        if insightface_layout:
            a = key
            for first, end in ranges:
                writer.write(pack(IRHeader((float(first), float(end)), id=key), b""), key=key)
                key += 1
            writer.rewrite(0, pack(IRHeader((float(a), float(key))), b""))
    _write_text(out / "property", f"{len(packed)},{image_size},{image_size}\n")
    _write_text(out / "identities.tsv", "".join(f"{i}\t{name}\n" for i, name in enumerate(packed)))
    return PackResult(rec_path, idx_path, num_images, tuple(packed), tuple(skipped))


def _write_identities(
    writer: RecordWriter, listing: IdentityFolder, encoded: Iterator[bytes | str], key: int, bar: object
) -> tuple[list[tuple[int, int]], list[str], list[tuple[str, str]]]:
    """Write image records grouped by identity from key `key` on.

    Returns ([first, end) keys per packed identity, packed identity names, (file, reason) skipped).
    An identity's class id is the number of identities packed before it, so identities whose
    images were all skipped leave no gap in the labels.
    """
    ranges: list[tuple[int, int]] = []
    packed: list[str] = []
    skipped: list[tuple[str, str]] = []
    for class_id, paths in listing.groups():
        first = key
        for path in paths:
            result = next(encoded)
            bar.update(1)
            if isinstance(result, str):
                skipped.append((str(path), result))
                continue
            writer.write(pack(IRHeader(float(len(packed)), id=key), result), key=key)
            key += 1
        if key > first:
            ranges.append((first, key))
            packed.append(listing.identities[class_id])
    return ranges, packed, skipped


def _safe(encoder: Encoder) -> Encoder:
    def encode(path: Path) -> bytes | str:
        try:
            return encoder(path)
        except (OSError, ValueError) as exc:  # unreadable file: skip it, keep packing the rest
            return f"{exc.__class__.__name__}: {exc}"

    return encode


def _ordered_map(pool: ThreadPoolExecutor, fn: Encoder, items: Iterable[Path], window: int) -> Iterator[bytes | str]:
    """`pool.map` in input order with at most `window` tasks in flight, so memory stays bounded
    however many images there are (Executor.map would submit all of them at once)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
