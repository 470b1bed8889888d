"""ArcFace 5-point alignment: a similarity transform (rotation, uniform scale, translation) that
maps the detected landmarks onto the template, then a bilinear warp to 112x112 with zero border —
the same geometry as InsightFace's `norm_crop`, so crops match the ones LVFace was trained on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..models.data_config import normalize_crops
from ..models.pretrained import ARCFACE_TEMPLATE_112


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama, 1991) taking `src` points to `dst`.

    Args:
        src: (K, 2) points in the image.
        dst: (K, 2) template points.

    Returns:
        (2, 3) affine matrix M with dst ~= M @ [x, y, 1].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"landmarks must be (K, 2) with K >= 2 matching the template, got {src.shape} vs {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var < 1e-12:
        raise ValueError("landmarks are degenerate (all points coincide)")
    cov = dst_c.T @ src_c / len(src)  # (2, 2)
    U, S, Vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:  # keep a rotation, not a reflection
        d[-1] = -1
    R = U @ np.diag(d) @ Vt
    scale = (S * d).sum() / src_var
    t = dst_mean - scale * R @ src_mean
    return np.hstack([scale * R, t[:, None]])


def align_face(
    image: np.ndarray,
    landmarks: np.ndarray,
    output_size: int = 112,
    template: Sequence[Sequence[float]] = ARCFACE_TEMPLATE_112,
) -> np.ndarray:
    """Warp one face to the ArcFace template.

    Args:
        image: (H, W, 3) uint8 RGB image.
        landmarks: (5, 2) points: left eye, right eye, nose, left mouth corner, right mouth corner
            (image-left first, as detectors report them).
        output_size: side of the square crop; the template is scaled from 112.
        template: (5, 2) destination points for a 112x112 crop.

    Returns:
        (output_size, output_size, 3) uint8 RGB crop.
    """
    import cv2

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"align_face expects an (H, W, 3) RGB image, got shape {image.shape}")
    dst = np.asarray(template, dtype=np.float64) * (output_size / 112.0)
    M = estimate_similarity(np.asarray(landmarks, dtype=np.float64).reshape(-1, 2), dst)
    return cv2.warpAffine(image, M, (output_size, output_size), flags=cv2.INTER_LINEAR, borderValue=0.0)


def to_model_input(
    crops: np.ndarray | Sequence[np.ndarray],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Aligned uint8 RGB crops (N, 112, 112, 3) -> normalised (N, 3, 112, 112) tensor in [-1, 1].

    The normalisation is the encoder's data config (`lvface_mm.models.normalize_crops`).
    """
    array = np.stack(list(crops)) if not isinstance(crops, np.ndarray) else crops
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"crops must be (N, H, W, 3) RGB, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"crops must be uint8 RGB (0-255), got dtype {array.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(array)).to(device=device).permute(0, 3, 1, 2)  # (N, 3, H, W)
    return normalize_crops(x).to(dtype)
