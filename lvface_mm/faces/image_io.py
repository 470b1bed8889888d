"""Loading pictures into (H, W, 3) uint8 RGB arrays, with errors that name the file.

Everything a photo folder contains is handled or refused with a reason: non-images, truncated
files, grayscale, palette, CMYK, RGBA (composited on black, the colour the alignment border uses),
16-bit PNGs (scaled, not clipped), multi-frame files (first frame), EXIF orientation (applied), and
huge images: JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (memory stays bounded); other
formats above the pixel limit are refused before decoding.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # a 50 MP RGB image is 150 MB decoded

ImageInput = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray]  # noqa: F821 - PIL is imported lazily


class ImageLoadError(ValueError):
    """An input could not be turned into an RGB image. `source` names the file (or input)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True, eq=False)  # holds an array: compare fields explicitly
class LoadedImage:
    """A decoded image and how it relates to the original.

    Attributes:
        array: (H, W, 3) uint8 RGB, EXIF orientation applied.
        source: file path, or a label such as `<array 3>` for in-memory inputs.
        original_size: (width, height) of the original after EXIF rotation.
        scale: decoded size / original size (1.0 unless a huge JPEG was decoded reduced).
    """

    array: np.ndarray
    source: str
    original_size: tuple[int, int]
    scale: float = 1.0


def describe_source(image: object, index: int | None = None) -> str:
    """A human-readable name for an input: its path, a PIL image's filename, or its position."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    filename = getattr(image, "filename", "")
    if isinstance(filename, str) and filename:
        return filename
    kind = "array" if isinstance(image, np.ndarray) else type(image).__name__
    return f"<{kind} {index}>" if index is not None else f"<{kind}>"


def load_image(
    image: ImageInput, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, source: str | None = None
) -> LoadedImage:
    """Decode a path, PIL image or array into a `LoadedImage`; raise `ImageLoadError` naming it if impossible."""
    from PIL import Image

    source = source or describe_source(image)
    if isinstance(image, np.ndarray):
        array = array_to_rgb(image, source)
        return LoadedImage(array, source, (array.shape[1], array.shape[0]))
    if isinstance(image, Image.Image):
        return _from_pil(image, source, max_pixels)
    if isinstance(image, (str, os.PathLike)):
        return _from_path(Path(image), source, max_pixels)
    raise ImageLoadError(source, f"unsupported input type {type(image).__name__}; expected a path, PIL image or array")


def _from_path(path: Path, source: str, max_pixels: int) -> LoadedImage:
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise ImageLoadError(source, "file not found")
    if path.is_dir():
        raise ImageLoadError(source, "is a directory, not an image file")
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return _from_pil(im, source, max_pixels)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(source, "not an image, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(source, f"refused: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated and corrupt files surface here on decode ("image file is truncated", "broken data stream").
        raise ImageLoadError(source, f"truncated or corrupt image ({exc})") from None
    except MemoryError:
        raise ImageLoadError(source, "out of memory while decoding; lower max_pixels") from None


def _from_pil(im: PIL.Image.Image, source: str, max_pixels: int) -> LoadedImage:  # noqa: F821
    from PIL import ImageOps

    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(source, f"empty image ({width}x{height})")
    scale = 1.0
    if width * height > max_pixels:
        factor = 1
        while (width // factor) * (height // factor) > max_pixels and factor < 8:
            factor *= 2
        # draft() makes libjpeg decode at 1/factor directly, so the full image is never in memory.
        if getattr(im, "format", None) == "JPEG" and im.mode in ("RGB", "L", "CMYK") and factor > 1:
            im.draft(im.mode, (-(-width // factor), -(-height // factor)))
        if im.size[0] * im.size[1] > max_pixels:
            raise ImageLoadError(
                source,
                f"{width}x{height} = {width * height / 1e6:.1f} MP exceeds the limit of {max_pixels / 1e6:.1f} MP "
                f"(only JPEGs can be decoded reduced, by up to 8x); downscale it or raise max_pixels",
            )
        scale = im.size[0] / width
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im.load()
    orientation = im.getexif().get(0x0112, 1)
    im = ImageOps.exif_transpose(im)
    original_size = (width, height) if orientation not in (5, 6, 7, 8) else (height, width)
    return LoadedImage(pil_to_rgb(im, source), source, original_size, scale)


def pil_to_rgb(im: PIL.Image.Image, source: str = "<image>") -> np.ndarray:  # noqa: F821
    """Any PIL mode -> (H, W, 3) uint8 RGB."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return array_to_rgb(np.asarray(im), source, sixteen_bit=mode.startswith("I"))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return array_to_rgb(np.asarray(im.convert("RGBA")), source)
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()  # L, 1, CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError) as exc:
        raise ImageLoadError(source, f"cannot convert image mode {mode} to RGB ({exc})") from None


def array_to_rgb(array: np.ndarray, source: str = "<array>", sixteen_bit: bool = False) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array -> (H, W, 3) uint8 RGB.

    uint8 is taken as is; uint16 (and integer PIL modes) are scaled from 0..65535; floats must lie in
    [0, 1]; an alpha channel is composited on black.
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        raise ImageLoadError(source, f"array of shape {a.shape} looks channel-first; pass (H, W, C)")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageLoadError(source, f"expected an (H, W), (H, W, 3) or (H, W, 4) image array, got shape {a.shape}")
    if a.dtype == np.uint8:
        x = a.astype(np.float32) if a.shape[2] == 4 else a
    elif a.dtype == np.uint16 or (sixteen_bit and np.issubdtype(a.dtype, np.integer)):
        if a.min() < 0 or a.max() > 65535:
            raise ImageLoadError(source, f"integer image values {a.min()}..{a.max()} are outside 0..65535")
        x = a.astype(np.float32) / 257.0  # 65535 -> 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ImageLoadError(source, f"float images must lie in [0, 1], got {np.nanmin(a):.3g}..{np.nanmax(a):.3g}")
        x = a.astype(np.float32) * 255.0
    else:
        raise ImageLoadError(source, f"unsupported array dtype {a.dtype}; expected uint8, uint16 or float in [0, 1]")
    if x.shape[2] == 4:
        alpha = x[..., 3:] / 255.0
        x = x[..., :3] * alpha  # composite on black
    elif x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)
