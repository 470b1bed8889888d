"""Pair verification as InsightFace reports it on LFW, CFP-FP, AgeDB-30, CALFW, CPLFW.

Protocol (arcface_torch `eval/verification.py`, reproduced number for number):
    - embedding of a pair image = model(image) + model(flipped image), L2-normalised
      ("Accuracy-Flip"; the non-flip accuracy uses model(image) alone);
    - distance = squared Euclidean between the two normalised embeddings, in [0, 4];
    - 10 contiguous folds over pair order (KFold without shuffling; for LFW these are the official
      splits of 600 pairs because the .bin keeps pairs.txt order);
    - per fold, the threshold in 0, 0.01, ..., 3.99 with the best accuracy on the other 9 folds
      (the first one on ties) decides "same" as distance < threshold on the held-out fold;
    - mean and (population) standard deviation of the 10 fold accuracies.

What differs and why: both flip and non-flip accuracies are computed (the reference hard-codes the
non-flip one to 0); TAR@FAR is measured on all pairs with `roc.tar_at_far` (the reference's
per-fold `interp1d` fails on current scipy) on the full ROC (no collinear points dropped), taking
the highest TPR among equally close points as InsightFace's IJB scripts do (with only a few
thousand impostor pairs, the lowest one is often the (0, 0) start point: TAR 0 for a model that
separates every pair); the chosen
thresholds are also given as cosine similarity (cos = 1 - d / 2), the form `lvface_mm` galleries use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .roc import RocCurve, TarAtFar, roc_curve, tar_at_far

DISTANCE_THRESHOLDS = np.arange(0, 4, 0.01)  # the reference's grid, bit for bit


def kfold_indices(n: int, n_folds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of contiguous folds; the first n % n_folds folds get one extra."""
    if n_folds < 2 or n < n_folds:
        raise ValueError(f"need at least {n_folds} pairs for {n_folds} folds, got {n}")
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    bounds = np.r_[0, np.cumsum(sizes)]
    all_idx = np.arange(n)
    return [(np.r_[all_idx[:lo], all_idx[hi:]], all_idx[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def accuracy_per_threshold(distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of "same iff distance < t" for every t at once (same counts as a loop of np.less)."""
    same = np.sort(distances[issame].astype(np.float64))
    diff = np.sort(distances[~issame].astype(np.float64))
    true_accepts = np.searchsorted(same, thresholds, side="left")  # same pairs with d < t
    true_rejects = len(diff) - np.searchsorted(diff, thresholds, side="left")  # different pairs with d >= t
    return (true_accepts + true_rejects) / len(distances)


@dataclass(frozen=True)
class FoldAccuracy:
    """10-fold result for one embedding variant.

    Attributes:
        fold_accuracies: (F,) held-out accuracy of each fold.
        fold_thresholds: (F,) squared-distance threshold chosen on the other folds.
    """

    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.fold_accuracies))

    @property
    def threshold(self) -> float:
        """Mean chosen squared distance."""
        return float(np.mean(self.fold_thresholds))

    @property
    def cosine_threshold(self) -> float:
        """The same threshold as cosine similarity: same iff cos > 1 - d / 2."""
        return 1.0 - self.threshold / 2.0


def ten_fold_accuracy(
    distances: np.ndarray,
    issame: np.ndarray,
    n_folds: int = 10,
    thresholds: np.ndarray = DISTANCE_THRESHOLDS,
) -> FoldAccuracy:
    """The InsightFace k-fold protocol on precomputed pair distances."""
    distances = np.asarray(distances).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if distances.shape != issame.shape:
        raise ValueError(f"{len(distances)} distances for {len(issame)} labels")
    accuracies, chosen = [], []
    for train, test in kfold_indices(len(distances), n_folds):
        best = int(np.argmax(accuracy_per_threshold(distances[train], issame[train], thresholds)))
        t = thresholds[best]
        accuracies.append(float(np.mean((distances[test] < t) == issame[test])))
        chosen.append(float(t))
    return FoldAccuracy(np.asarray(accuracies), np.asarray(chosen))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(x.dtype).tiny)


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """(2N, D) normalised embeddings, pairs interleaved -> (N,) squared Euclidean distances."""
    diff = embeddings[0::2] - embeddings[1::2]
    return np.sum(np.square(diff), axis=1)


@dataclass(frozen=True)
class VerificationResult:
    """Everything reported for one model on one verification set."""

    flip: FoldAccuracy
    plain: FoldAccuracy
    tar: tuple[TarAtFar, ...]  # empty when the set has only genuine or only impostor pairs
    roc: RocCurve | None = field(repr=False)  # None in that case too
    xnorm: float
    num_pairs: int

    def to_dict(self) -> dict[str, object]:
        def fold(f: FoldAccuracy) -> dict[str, object]:
            return {
                "mean": f.mean,
                "std": f.std,
                "folds": f.fold_accuracies.tolist(),
                "threshold_distance": f.threshold,
                "threshold_cosine": f.cosine_threshold,
                "fold_thresholds_distance": f.fold_thresholds.tolist(),
            }

        return {
            "pairs": self.num_pairs,
            "accuracy_flip": fold(self.flip),
            "accuracy": fold(self.plain),
            "tar_at_far": [t.to_dict() for t in self.tar],
            "xnorm": self.xnorm,
        }


def evaluate_verification(
    embeddings: np.ndarray,
    flipped: np.ndarray | None,
    issame: np.ndarray,
    fars: Sequence[float] = (1e-3, 1e-4),
    n_folds: int = 10,
) -> VerificationResult:
    """Score one verification set from raw (un-normalised) embeddings.

    Args:
        embeddings: (2N, D) embeddings of the images, pairs interleaved (2i, 2i+1).
        flipped: (2N, D) embeddings of the horizontally flipped images, or None (then the flip
            accuracy equals the plain one).
        issame: (N,) True for genuine pairs.
        fars: FARs for TAR@FAR, measured on the flip-sum cosine similarities of all pairs.
        n_folds: folds of the accuracy protocol.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    issame = np.asarray(issame, dtype=bool)
    if embeddings.ndim != 2 or len(embeddings) != 2 * len(issame):
        raise ValueError(f"expected (2N, D) embeddings for N={len(issame)} pairs, got shape {embeddings.shape}")
    views = [embeddings] if flipped is None else [embeddings, np.asarray(flipped, dtype=np.float32)]
    if flipped is not None and views[1].shape != embeddings.shape:
        raise ValueError(f"flipped embeddings {views[1].shape} do not match {embeddings.shape}")
    xnorm = float(np.mean([np.linalg.norm(v, axis=1).mean() for v in views]))
    combined = l2_normalize(embeddings + views[1]) if flipped is not None else l2_normalize(embeddings)
    plain = ten_fold_accuracy(pair_distances(l2_normalize(embeddings)), issame, n_folds)
    flip = ten_fold_accuracy(pair_distances(combined), issame, n_folds) if flipped is not None else plain
    if issame.all() or not issame.any():  # accuracy is defined, an ROC is not
        return VerificationResult(flip, plain, (), None, xnorm, len(issame))
    cosine = np.sum(combined[0::2].astype(np.float64) * combined[1::2], axis=1)  # (N,)
    curve = roc_curve(issame, cosine, drop_intermediate=False)
    tars = tuple(tar_at_far(curve, f) for f in fars)
    return VerificationResult(flip, plain, tars, curve, xnorm, len(issame))
