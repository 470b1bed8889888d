"""Enrolled identities (SQLite store, calibrated 1:N search) and photo-collection retrieval.

`Gallery`, the search index and `PhotoIndex` need only numpy and the standard library (FAISS
optional); the CLIP encoder (`lvface_mm.gallery.clip`) and the demo logic
(`lvface_mm.gallery.workbench`) import torch, open_clip and the face pipeline.
"""

from .calibration import (
    DEFAULT_THRESHOLDS,
    Calibration,
    ThresholdDefault,
    calibrate,
    default_threshold,
    far_at_threshold,
    pair_scores,
    tar_at_threshold,
    threshold_at_far,
)
from .index import IndexConfig, VectorIndex, create_index, list_indexes, register_index
from .photos import IndexReport, PhotoFace, PhotoHit, PhotoIndex, split_query
from .store import Gallery, GalleryConfig, Identification, Identity

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Calibration",
    "Gallery",
    "GalleryConfig",
    "Identification",
    "Identity",
    "IndexConfig",
    "IndexReport",
    "PhotoFace",
    "PhotoHit",
    "PhotoIndex",
    "ThresholdDefault",
    "VectorIndex",
    "calibrate",
    "create_index",
    "default_threshold",
    "far_at_threshold",
    "list_indexes",
    "pair_scores",
    "register_index",
    "split_query",
    "tar_at_threshold",
    "threshold_at_far",
]
