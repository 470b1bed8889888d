"""Face-recognition evaluation: 10-fold pair verification, ROC and TAR@FAR, IJB-B/C templates,
embedding extraction with a resumable cache, ROC plots and JSON reports."""

from .extract import Embeddings, extract_embeddings, model_fingerprint
from .ijb import (
    IJB_FARS,
    GalleryResult,
    IdentificationResult,
    IJBResult,
    evaluate_ijb,
    image_features,
    pair_scores,
    search_gallery,
    template_features,
)
from .plots import plot_roc
from .report import run_info, write_json
from .roc import RocCurve, TarAtFar, auc, roc_curve, tar_at_far, tar_at_fars
from .verification import (
    DISTANCE_THRESHOLDS,
    FoldAccuracy,
    VerificationResult,
    accuracy_per_threshold,
    evaluate_verification,
    kfold_indices,
    l2_normalize,
    pair_distances,
    ten_fold_accuracy,
)

__all__ = [
    "DISTANCE_THRESHOLDS",
    "IJB_FARS",
    "Embeddings",
    "FoldAccuracy",
    "GalleryResult",
    "IJBResult",
    "IdentificationResult",
    "RocCurve",
    "TarAtFar",
    "VerificationResult",
    "accuracy_per_threshold",
    "auc",
    "evaluate_ijb",
    "evaluate_verification",
    "extract_embeddings",
    "image_features",
    "kfold_indices",
    "l2_normalize",
    "model_fingerprint",
    "pair_distances",
    "pair_scores",
    "plot_roc",
    "roc_curve",
    "run_info",
    "search_gallery",
    "tar_at_far",
    "tar_at_fars",
    "template_features",
    "ten_fold_accuracy",
    "write_json",
]
