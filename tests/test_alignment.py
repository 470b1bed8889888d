"""ArcFace 5-point alignment: the similarity fit, the warp, and crop normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lvface_mm.faces import align_face, estimate_similarity, to_model_input
from lvface_mm.models.pretrained import ARCFACE_TEMPLATE_112

TEMPLATE = np.asarray(ARCFACE_TEMPLATE_112, dtype=np.float64)


def similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    R = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return np.hstack([R, [[tx], [ty]]])


def apply(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ M[:, :2].T + M[:, 2]


@pytest.mark.parametrize(
    "angle,scale,tx,ty", [(0, 1, 0, 0), (17, 2.3, 140, 60), (-35, 0.6, 20, 200), (170, 4.0, 500, 450)]
)
def test_landmarks_land_on_template(angle, scale, tx, ty):
    # Landmarks of a face seen through a known similarity: the fit must undo it exactly.
    src = apply(similarity(angle, scale, tx, ty), TEMPLATE)
    M = estimate_similarity(src, TEMPLATE)
    err = np.linalg.norm(apply(M, src) - TEMPLATE, axis=1)
    assert err.max() < 0.5
    assert err.max() < 1e-6  # noise-free, the least-squares fit is exact
    # The fit is a similarity: equal column norms, orthogonal columns, no reflection.
    A = M[:, :2]
    assert np.isclose(np.linalg.norm(A[:, 0]), np.linalg.norm(A[:, 1]))
    assert abs(A[:, 0] @ A[:, 1]) < 1e-9 and np.linalg.det(A) > 0
    assert np.isclose(np.linalg.norm(A[:, 0]), 1 / scale)


def test_fit_with_noisy_landmarks_stays_close():
    rng = np.random.default_rng(0)
    src = apply(similarity(10, 3.0, 300, 200), TEMPLATE) + rng.normal(0, 0.5, (5, 2))
    err = np.linalg.norm(apply(estimate_similarity(src, TEMPLATE), src) - TEMPLATE, axis=1)
    assert err.max() < 0.5  # 0.5 px source noise shrinks by the 3x scale-down


def test_mirrored_landmarks_still_give_a_rotation():
    src = TEMPLATE * [-1, 1] + [200, 0]  # left and right swapped: best fit would be a reflection
    M = estimate_similarity(src, TEMPLATE)
    assert np.linalg.det(M[:, :2]) > 0


@pytest.mark.parametrize(
    "src,dst",
    [(np.zeros((5, 2)), TEMPLATE), (TEMPLATE[:4], TEMPLATE), (np.ones((5, 3)), np.ones((5, 3)))],
    ids=["degenerate", "count-mismatch", "not-2d"],
)
def test_bad_landmarks_raise_value_error(src, dst):
    with pytest.raises(ValueError, match="landmarks"):
        estimate_similarity(src, dst)


def gaussian_dot(h: int, w: int, x: float, y: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize("angle,scale", [(0.0, 2.0), (23.0, 2.7), (-12.0, 1.6)])
def test_warp_puts_dots_on_template(angle, scale):
    # Draw each landmark as a blurred dot in a big image, warp, and find the dot in the crop.
    h, w = 480, 560
    M_true = similarity(angle, scale, 150, 90)
    src = apply(M_true, TEMPLATE)
    for i in range(5):
        dot = gaussian_dot(h, w, *src[i], sigma=2.0 * scale)
        image = np.repeat((dot * 255).round().astype(np.uint8)[..., None], 3, axis=2)
        crop = align_face(image, src)
        assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
        weight = crop[..., 0].astype(np.float64)
        # Centroid in a window around the expected spot (other dots are not drawn in this image).
        cx, cy = TEMPLATE[i]
        yy, xx = np.mgrid[:112, :112]
        window = (np.abs(xx - cx) <= 6) & (np.abs(yy - cy) <= 6)
        wsum = (weight * window).sum()
        found = np.array([(xx * weight * window).sum() / wsum, (yy * weight * window).sum() / wsum])
        assert np.linalg.norm(found - TEMPLATE[i]) < 0.5, (i, found, TEMPLATE[i])
        peak_y, peak_x = np.unravel_index(np.argmax(weight), weight.shape)
        assert abs(peak_x - cx) <= 1 and abs(peak_y - cy) <= 1


def test_warp_border_is_black_and_output_size_scales_template():
    image = np.full((200, 200, 3), 200, np.uint8)
    src = apply(similarity(0, 0.3, 80, 80), TEMPLATE)  # face much smaller than the crop: zoom in
    crop = align_face(image, src)
    assert (crop == 200).all()  # fully inside the image, no border
    src_big = apply(similarity(0, 5.0, 0, 0), TEMPLATE) - 500  # landmarks mostly outside the image
    crop = align_face(image, src_big, output_size=224)
    assert crop.shape == (224, 224, 3)
    assert (crop == 0).any() and (crop == 200).any()


def test_align_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        align_face(np.zeros((50, 50), np.uint8), TEMPLATE)


def test_to_model_input_range_layout_and_dtype():
    crops = np.zeros((2, 112, 112, 3), np.uint8)
    crops[0, ..., 0] = 255  # first crop pure red
    crops[1, 5, 7] = (0, 128, 255)
    x = to_model_input(crops)
    assert x.shape == (2, 3, 112, 112) and x.dtype == torch.float32
    assert torch.equal(x[0, 0], torch.ones(112, 112)) and torch.equal(x[0, 1], -torch.ones(112, 112))
    assert torch.allclose(x[1, :, 5, 7], torch.tensor([-1.0, 0.5 / 127.5, 1.0]))
    assert to_model_input(crops[0], dtype=torch.bfloat16).shape == (1, 3, 112, 112)
    with pytest.raises(ValueError, match="RGB"):
        to_model_input(np.zeros((2, 112, 112), np.uint8)[None, ..., None])
