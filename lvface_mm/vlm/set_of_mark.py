"""Set-of-Mark prompting: numbered boxes drawn on the picture, faces called by their mark.

Works with any VLM and no training (Yang et al., 2023, "Set-of-Mark Prompting"): the model reads
the number next to each box in the pixels and the prompt says who "mark 2" is, so it can tie a name
to a region it sees. Each face gets a rectangle outline and, at its top-left corner, a filled tag
with its 1-based number (the face's `number` in the grounding text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MarkStyle:
    """How marks look. Colours are RGB; `width` is the outline thickness in pixels."""

    colour: tuple[int, int, int] = (255, 0, 0)
    text_colour: tuple[int, int, int] = (255, 255, 255)
    width: int = 2

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"MarkStyle.width must be >= 1, got {self.width}")
        for name in ("colour", "text_colour"):
            value = getattr(self, name)
            if len(value) != 3 or not all(0 <= int(c) <= 255 for c in value):
                raise ValueError(f"MarkStyle.{name} must be an RGB triple in 0-255, got {value!r}")


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer pixel box inside a `width` x `height` picture (detector boxes may overhang the edge)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = int(np.clip(np.floor(x1), 0, width - 1)), int(np.clip(np.floor(y1), 0, height - 1))
    right, bottom = int(np.clip(np.ceil(x2), left + 1, width)), int(np.clip(np.ceil(y2), top + 1, height))
    return left, top, right, bottom


def draw_marks(
    image: np.ndarray,
    boxes: Sequence[Sequence[float]] | np.ndarray,
    numbers: Sequence[int] | None = None,
    style: MarkStyle | None = None,
) -> np.ndarray:
    """A copy of `image` with a numbered box per face.

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) x1, y1, x2, y2 in pixels.
        numbers: the mark of each box (default 1..N).
        style: colours and line width.

    Returns:
        (H, W, 3) uint8 RGB; the input is not modified.
    """
    from PIL import Image, ImageDraw, ImageFont

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"draw_marks: image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    numbers = list(range(1, len(boxes) + 1)) if numbers is None else [int(n) for n in numbers]
    if len(numbers) != len(boxes):
        raise ValueError(f"draw_marks: {len(numbers)} numbers for {len(boxes)} boxes")
    style = style or MarkStyle()
    height, width = image.shape[:2]
    canvas = Image.fromarray(image.copy())
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for box, number in zip(boxes, numbers):
        left, top, right, bottom = clip_box(box, width, height)
        draw.rectangle((left, top, right - 1, bottom - 1), outline=style.colour, width=style.width)
        label = str(number)
        tx1, ty1, tx2, ty2 = draw.textbbox((0, 0), label, font=font)
        # The tag sits inside the box's top-left corner, so it never leaves the picture.
        tag = (left, top, min(width - 1, left + tx2 - tx1 + 3), min(height - 1, top + ty2 - ty1 + 3))
        draw.rectangle(tag, fill=style.colour)
        draw.text((tag[0] + 2 - tx1, tag[1] + 2 - ty1), label, fill=style.text_colour, font=font)
    return np.array(canvas)  # writable, as processors expect


__all__ = ["MarkStyle", "clip_box", "draw_marks"]
