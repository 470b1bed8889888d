"""Enrolled identities (SQLite store, calibrated 1:N search) and photo-collection retrieval.

`Gallery` and the search index need only numpy and the standard library (FAISS optional); the
photo index (`lvface_mm.gallery.photos`) imports open_clip and the face pipeline when used.
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
from .store import Gallery, GalleryConfig, Identification, Identity

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Calibration",
    "Gallery",
    "GalleryConfig",
    "Identification",
    "Identity",
    "IndexConfig",
    "ThresholdDefault",
    "VectorIndex",
    "calibrate",
    "create_index",
    "default_threshold",
    "far_at_threshold",
    "list_indexes",
    "pair_scores",
    "register_index",
    "tar_at_threshold",
    "threshold_at_far",
]
