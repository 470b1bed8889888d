"""Reusable helpers for tests that need a tiny VLM with the identity bridge.

Import the helpers directly (`from tests._vlm_fixtures import tiny_identity_vlm`) or through the
`tiny_vlm_factory` fixture. Every model is random, built from a config, offline and CPU-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from lvface_mm.vlm import IdentityVLM
from lvface_mm.vlm.testing import TinyVLM, build_tiny_vlm, list_tiny_builds, random_face_crops, tiny_card
from lvface_mm.vlm.testing import tiny_identity_vlm as _tiny_identity_vlm

TINY_BUILDS = tuple(list_tiny_builds())
# Builds whose real processor runs in tests: all of them (tiny SmolVLM uses Idefics3's processor).
PROCESSOR_BUILDS = TINY_BUILDS


def tiny_identity_vlm(build: str, seed: int = 0, **card_changes: Any) -> IdentityVLM:
    """An IdentityVLM around a tiny random model (`lvface_tiny` encoder, K=2 unless changed)."""
    return _tiny_identity_vlm(build, adapter=tiny_card(build, **card_changes), seed=seed)


def base_model(build: str, seed: int = 0) -> TinyVLM:
    """The same tiny model without the bridge: the reference for "outputs unchanged" checks."""
    return build_tiny_vlm(build, seed=seed)


@dataclass(frozen=True)
class Face:
    """A face as a detector/embedder pipeline hands it over: box + aligned crop (+ embedding)."""

    box: tuple[float, float, float, float]
    crop: np.ndarray
    embedding: np.ndarray | None = None


def faces_at(boxes: list[tuple[float, float, float, float]], seed: int = 0) -> list[Face]:
    crops = random_face_crops(len(boxes), seed=seed)
    return [Face(b, c) for b, c in zip(boxes, crops)]


@pytest.fixture
def tiny_vlm_factory():
    """`tiny_vlm_factory(build, **card_changes)` -> IdentityVLM."""
    return tiny_identity_vlm


def logits_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


__all__ = [
    "PROCESSOR_BUILDS",
    "TINY_BUILDS",
    "Face",
    "base_model",
    "faces_at",
    "logits_of",
    "tiny_identity_vlm",
    "tiny_vlm_factory",
]
