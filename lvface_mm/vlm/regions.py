"""Region features: what is around each face, read from the VLM's own vision tower.

Identity tokens say *who* a face is; questions such as "What is Koren holding?" also need *what is
next to that face* in the picture. A LLaVA-style model has both in its context (identity tokens in
the text, patch features of the picture), but linking a face's box, written as numbers, to the
patches at that place is a spatial lookup small models did not learn in our budgets
(docs/adapter_training.md, section 5). This module hands it over in the tokens, as region-of-interest
features do in GPT4RoI (Zhang et al., 2023) and Osprey (Yuan et al., 2024):

    region_i  = box around face i where the person's body and what they hold are (`person_region`)
    cells_i   = region_i split 3 x 3; per cell the mean of the patches centred in it   (F, 9, d)
    r_i       = tanh(gate) * norm * unit(combine(reduce(LayerNorm(cells_i))))          (F, d)
    face i      ->  normalise(t_i + r_i) * norm
    reference j ->  normalise(t_j + sum_i g_ij r_i) * norm        (g: the matcher's cosine gate)

The patches are the features the model itself merges into the prompt (after its multi-modal
projector, so already in the LLM's width d). A reference that matches face i carries face i's region
too, so the name written after it is one attention step away from what that person holds. The gate
starts at 0: a fresh reader leaves every token exactly as the projector (and matcher) made it.

The vision tower runs once more for the reader (the model runs it again inside its own forward);
only families whose patch grid and processor geometry are known support it (`VLMFamily.
supports_region_features`): LLaVA-1.5 and PaliGemma (`families.base.SquareGridRegions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# A person's region from their face box (face widths / heights): the body and what is held beside
# it lie below the face and up to about one face width either side of it (the scenes of
# `lvface_mm.vqa.scenes` draw the object 2-26 px right of a 40 px face, the body below).
REGION_SPREAD = 1.2  # half-width of the region around the face centre, in face widths
REGION_DEPTH = 3.5  # from the face top down, in face heights


def person_region(box: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """The region (x1, y1, x2, y2, pixels) where the person of face `box` stands, inside the picture."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    cx = (x1 + x2) / 2
    return (
        max(0.0, cx - REGION_SPREAD * w),
        max(0.0, y1),
        min(float(width), cx + REGION_SPREAD * w),
        min(float(height), y1 + REGION_DEPTH * h),
    )


def _side(size: Mapping[str, Any] | None, key: str) -> int | None:
    if not size:
        return None
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return None if value is None else int(value)


def processed_box(
    box: Sequence[float], width: float, height: float, image_processor: Any
) -> tuple[float, float, float, float]:
    """Where a box of the original picture lands in a CLIP-style image processor's output, as
    fractions (0-1) of the processed square: optional padding to a square (`do_pad`), resizing to
    `size` (height/width, or shortest_edge keeping the aspect), optional centre crop (`crop_size`).

    Raises:
        ValueError: the processor's size settings are not one of those forms.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    W, H = float(width), float(height)
    if getattr(image_processor, "do_pad", False):  # LLaVA's pad-to-square, centred
        side = max(W, H)
        x1, x2 = x1 + (side - W) / 2, x2 + (side - W) / 2
        y1, y2 = y1 + (side - H) / 2, y2 + (side - H) / 2
        W = H = side
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "do_resize", True) is False:
        sx, sy = 1.0, 1.0
    elif _side(size, "height") and _side(size, "width"):
        sx, sy = _side(size, "width") / W, _side(size, "height") / H
    elif _side(size, "shortest_edge"):
        sx = sy = _side(size, "shortest_edge") / min(W, H)
    else:
        raise ValueError(
            f"{type(image_processor).__name__}.size={size!r}: region features need size "
            "{'height', 'width'} or {'shortest_edge'}"
        )
    x1, x2, y1, y2, W, H = x1 * sx, x2 * sx, y1 * sy, y2 * sy, W * sx, H * sy
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop:
        cw, ch = _side(crop, "width"), _side(crop, "height")
        x1, x2 = x1 - (W - cw) / 2, x2 - (W - cw) / 2
        y1, y2 = y1 - (H - ch) / 2, y2 - (H - ch) / 2
        W, H = float(cw), float(ch)

    def clip(v: float) -> float:
        return min(max(v, 0.0), 1.0)

    return clip(x1 / W), clip(y1 / H), clip(x2 / W), clip(y2 / H)


def region_masks(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """(F, 4) boxes as fractions of the processed picture -> (F, grid*grid) patch masks, row-major.

    A patch belongs to a region when its centre lies inside; a region too small to hold a centre
    (a face at the very edge after cropping) gets the patch nearest to its own centre.
    """
    centres = (torch.arange(grid, dtype=torch.float32, device=boxes.device) + 0.5) / grid  # (G,)
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # (G, G) each
    cx, cy = cx.reshape(1, -1), cy.reshape(1, -1)  # (1, G*G)
    b = boxes.float()
    inside = (cx >= b[:, :1]) & (cx <= b[:, 2:3]) & (cy >= b[:, 1:2]) & (cy <= b[:, 3:4])  # (F, G*G)
    mx, my = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2  # (F,)
    nearest = ((cx - mx[:, None]) ** 2 + (cy - my[:, None]) ** 2).argmin(dim=1)  # (F,)
    empty = ~inside.any(dim=1)
    inside[empty, nearest[empty]] = True
    return inside


def cell_boxes(boxes: torch.Tensor, cells: tuple[int, int]) -> torch.Tensor:
    """(F, 4) region boxes -> (F, rows*cols, 4) their cells, row-major (a RoIAlign-style split)."""
    rows, cols = cells
    x1, y1, x2, y2 = boxes.float().unbind(-1)  # (F,) each
    w, h = (x2 - x1) / cols, (y2 - y1) / rows
    r = torch.arange(rows, dtype=torch.float32, device=boxes.device).repeat_interleave(cols)  # (C,)
    c = torch.arange(cols, dtype=torch.float32, device=boxes.device).repeat(rows)  # (C,)
    left, top = x1[:, None] + c * w[:, None], y1[:, None] + r * h[:, None]  # (F, C)
    return torch.stack([left, top, left + w[:, None], top + h[:, None]], dim=-1)  # (F, C, 4)


class RegionReader(nn.Module):
    """Pools each face's region in a grid of cells and maps the cells to one vector of the LLM's width.

    A held object covers about one vision patch of the fifteen or more in a person's region; a mean
    over the whole region dilutes it away (a linear probe on the scenes reads the object's colour
    0.30 from the region mean, 0.71 from 3 x 3 cell means, as from the object's own patch), and a
    single learned attention query did not learn to find it. Cells keep where things are.

    Args:
        dim: width of the patch features (the LLM's hidden size, after the VLM's own projector).
        cells: (rows, cols) of the pooling grid over the region.
        cell_dim: width each cell is reduced to before the cells are combined.

    The output is `tanh(gate) * unit vector` (times the projector's norm in `add_region_features`):
    bounded by the identity tokens' own norm, and exactly zero while the gate is at its initial 0,
    as Flamingo's gated cross-attention starts.
    """

    def __init__(self, dim: int, cells: tuple[int, int] = (3, 3), cell_dim: int = 256) -> None:
        super().__init__()
        rows, cols = cells
        if rows < 1 or cols < 1:
            raise ValueError(f"RegionReader.cells must be two positive ints, got {cells!r}")
        self.cells = (int(rows), int(cols))
        self.norm = nn.LayerNorm(dim)
        self.reduce = nn.Linear(dim, cell_dim)
        self.combine = nn.Linear(rows * cols * cell_dim, dim)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, patches: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(P, d) patch features of one picture and (F, C, P) cell masks -> (F, d) region vectors."""
        C = self.cells[0] * self.cells[1]
        if patches.ndim != 2 or masks.ndim != 3 or masks.shape[1:] != (C, patches.shape[0]):
            raise ValueError(
                f"RegionReader expects patches (P, d) and cell masks (F, {C}, P), got {tuple(patches.shape)} "
                f"and {tuple(masks.shape)}"
            )
        x = patches.to(self.reduce.weight.dtype)
        weights = masks.to(x.dtype)
        pooled = (weights @ x) / weights.sum(-1, keepdim=True)  # (F, C, d) cell means
        cells = self.reduce(self.norm(pooled))  # (F, C, cell_dim)
        vector = self.combine(cells.flatten(1))  # (F, d)
        return torch.tanh(self.gate) * F.normalize(vector, dim=-1)


def add_region_features(
    projector: nn.Module,
    tokens: torch.Tensor,
    patches: torch.Tensor,
    boxes: torch.Tensor,
    num_faces: int,
    embeddings: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add each picture face's region vector to its tokens (and, gated, to the references it matches).

    Args:
        projector: the adapter's projector; unchanged tokens when it has no `region_reader`.
        tokens: (F + R, K, d) identity tokens, picture faces first (after `bind_references`).
        patches: (P, d) patch features of the picture, P = G*G (row-major grid).
        boxes: (F, 4) the faces' person regions as fractions of the processed picture.
        num_faces: F.
        embeddings: (F + R, D) L2-normalised embeddings for the matcher's gate; None = no references.
    Returns:
        (F + R, K, d), every token at the projector's output norm.
    """
    reader = getattr(projector, "region_reader", None)
    if reader is None or num_faces == 0:
        return tokens
    grid = int(round(patches.shape[0] ** 0.5))
    if grid * grid != patches.shape[0]:
        raise ValueError(f"region features need a square patch grid, got {patches.shape[0]} patches")
    if boxes.shape != (num_faces, 4):
        raise ValueError(f"region boxes must be ({num_faces}, 4) for {num_faces} faces, got {tuple(boxes.shape)}")
    cells = cell_boxes(boxes.to(patches.device), reader.cells)  # (F, C, 4)
    masks = region_masks(cells.reshape(-1, 4), grid).reshape(num_faces, cells.shape[1], -1)  # (F, C, P)
    norm = projector.output_norm.float()
    regions = reader(patches, masks).float() * norm  # (F, d), norm at most the tokens' own
    matcher = getattr(projector, "matcher", None)
    if tokens.shape[0] > num_faces and matcher is not None and embeddings is not None:
        emb = F.normalize(embeddings.to(device=regions.device, dtype=torch.float32), dim=-1)
        gates = matcher.gates(emb[:num_faces], emb[num_faces:])  # (F, R)
        added = torch.cat([regions, gates.T @ regions])  # (F + R, d)
    else:
        added = torch.cat([regions, regions.new_zeros(tokens.shape[0] - num_faces, regions.shape[1])])
    bound = tokens.float() + added[:, None, :].to(tokens.device)  # (F + R, K, d)
    return (F.normalize(bound, dim=-1) * norm).to(tokens.dtype)


__all__ = [
    "REGION_DEPTH",
    "REGION_SPREAD",
    "RegionReader",
    "add_region_features",
    "cell_boxes",
    "person_region",
    "processed_box",
    "region_masks",
]
