"""Face boxes written the way each model family was trained to read them.

A VLM that was pre-trained on grounding data reads boxes in one notation only; any other notation
is just digits to it. Three notations cover the supported families:

    normalized   "[0.125, 0.250, 0.500, 0.750]"  x1, y1, x2, y2 as fractions of width/height, 3 decimals
                 (LLaVA, LLaVA-NeXT, Idefics3/SmolVLM and text-only LLMs: none has a native box syntax)
    qwen         "<|box_start|>(125,250),(500,750)<|box_end|>"  integers on Qwen2-VL's 0-1000 grid
    paligemma    "<loc0256><loc0128><loc0768><loc0512>"  y1, x1, y2, x2 as PaliGemma's 1024 location
                 bins (`<loc0000>`..`<loc1023>`, bin = floor(fraction * 1024), clamped to 1023)

Families pick one by name (`VLMFamily.box_format`); new notations go in with `register_box_format`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

BoxFormatter = Callable[[Sequence[float], float, float], str]

_FORMATS: dict[str, BoxFormatter] = {}


def register_box_format(name: str) -> Callable[[BoxFormatter], BoxFormatter]:
    def wrap(fn: BoxFormatter) -> BoxFormatter:
        if name in _FORMATS:
            raise ValueError(f"box format {name!r} is already registered")
        _FORMATS[name] = fn
        return fn

    return wrap


def list_box_formats() -> list[str]:
    return sorted(_FORMATS)


def normalise_box(box: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """Pixel x1, y1, x2, y2 -> fractions of the picture, checked to lie inside it."""
    if width <= 0 or height <= 0:
        raise ValueError(f"picture size must be positive, got {width} x {height}")
    if len(box) != 4:
        raise ValueError(f"a box is [x1, y1, x2, y2], got {list(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"box {[x1, y1, x2, y2]} is not inside the {width:g} x {height:g} picture")
    return x1 / width, y1 / height, x2 / width, y2 / height


@register_box_format("normalized")
def normalized_box(box: Sequence[float], width: float, height: float) -> str:
    x1, y1, x2, y2 = normalise_box(box, width, height)
    return f"[{x1:.3f}, {y1:.3f}, {x2:.3f}, {y2:.3f}]"


@register_box_format("qwen")
def qwen_box(box: Sequence[float], width: float, height: float) -> str:
    x1, y1, x2, y2 = (round(v * 1000) for v in normalise_box(box, width, height))
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def loc_bin(fraction: float) -> int:
    """PaliGemma's location bin of a 0-1 coordinate."""
    return min(1023, max(0, math.floor(fraction * 1024)))


@register_box_format("paligemma")
def paligemma_box(box: Sequence[float], width: float, height: float) -> str:
    x1, y1, x2, y2 = normalise_box(box, width, height)
    return "".join(f"<loc{loc_bin(v):04d}>" for v in (y1, x1, y2, x2))


def format_box(fmt: str, box: Sequence[float], width: float, height: float) -> str:
    """`box` (pixels) in notation `fmt` for a `width` x `height` picture."""
    if fmt not in _FORMATS:
        raise ValueError(f"unknown box format {fmt!r}; known: {', '.join(list_box_formats())}")
    return _FORMATS[fmt](box, width, height)


__all__ = [
    "BoxFormatter",
    "format_box",
    "list_box_formats",
    "loc_bin",
    "normalise_box",
    "normalized_box",
    "paligemma_box",
    "qwen_box",
    "register_box_format",
]
