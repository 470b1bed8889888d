"""ROC curves and TAR at a fixed FAR, without scikit-learn and without interpolating over
duplicate FAR values.

Two conventions are reported side by side because papers and tools differ:
    closest       TPR at the ROC point whose FPR is numerically closest to the target, the highest
                  TPR among equally close points. This is InsightFace's IJB rule (`eval_ijbc.py`
                  flips the ROC "to select largest tpr at same fpr" before taking the minimum gap)
                  and what IJB-B/C tables in papers use; it runs on the curve with collinear points
                  dropped, as scikit-learn's `roc_curve` returns it by default. `ties="first"` takes
                  the lowest TPR instead (plain `np.argmin`): at a vertical step of the ROC that is
                  the bottom, e.g. the (0, 0) start point on a small impostor set, TAR 0 for scores
                  that separate perfectly. `resolved` says whether the FAR is measurable at all.
    interpolated  the ROC's upper envelope linearly interpolated at exactly the target FPR. Several
                  points can share one FPR (a vertical step); the envelope keeps the highest TPR of
                  each, which is what makes the interpolation well defined where `interp1d` fails
                  ("Expect x to not have duplicates").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class RocCurve:
    """An ROC curve, points ordered by increasing FPR.

    Attributes:
        fpr / tpr: (K,) rates, starting at (0, 0).
        thresholds: (K,) score thresholds; point k accepts scores >= thresholds[k] (first is +inf).
        num_pos / num_neg: genuine and impostor counts.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    num_pos: int
    num_neg: int


@dataclass(frozen=True)
class TarAtFar:
    """TAR at one target FAR under both conventions.

    Attributes:
        far: the target.
        tar_closest: TPR at the point with FPR closest to `far` (highest TPR on ties, unless `ties="first"`).
        fpr_closest: the FPR of that point (how close "closest" was).
        threshold_closest: its score threshold.
        tar_interpolated: upper-envelope TPR interpolated at exactly `far`.
        resolved: False when `far` is below 1 / num_neg, i.e. the impostor set is too small to
            measure it (both numbers are then extrapolations from the first ROC points).
    """

    far: float
    tar_closest: float
    fpr_closest: float
    threshold_closest: float
    tar_interpolated: float
    resolved: bool

    def to_dict(self) -> dict[str, float | bool]:
        return {
            "far": self.far,
            "tar_closest": self.tar_closest,
            "fpr_closest": self.fpr_closest,
            "threshold_closest": self.threshold_closest,
            "tar_interpolated": self.tar_interpolated,
            "resolved": self.resolved,
        }


def roc_curve(labels: np.ndarray, scores: np.ndarray, drop_intermediate: bool = True) -> RocCurve:
    """ROC of `scores` (higher = more likely genuine) against boolean `labels`.

    Args:
        labels: (N,) bool or 0/1, True for genuine pairs.
        scores: (N,) similarity scores.
        drop_intermediate: drop points collinear with their neighbours (scikit-learn's default);
            the curve's shape is unchanged.

    Raises:
        ValueError: mismatched lengths, non-finite scores, or only one class present.
    """
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must have the same length")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    num_pos = int(labels.sum())
    num_neg = len(labels) - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"an ROC needs genuine and impostor pairs, got {num_pos} genuine and {num_neg} impostor")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # One ROC point per distinct score: the last position of each run of equal scores.
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tps = np.cumsum(sorted_labels)[ends]
    fps = ends + 1 - tps
    thresholds = sorted_scores[ends]
    if drop_intermediate and len(ends) > 2:
        corner = np.r_[True, np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0), True]
        tps, fps, thresholds = tps[corner], fps[corner], thresholds[corner]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    return RocCurve(fps / num_neg, tps / num_pos, thresholds, num_pos, num_neg)


def tar_at_far(curve: RocCurve, far: float, ties: Literal["best", "first"] = "best") -> TarAtFar:
    """TAR at one FAR on `curve` under both conventions (see module docstring).

    Args:
        curve: the ROC.
        far: target false accept rate.
        ties: which of several points equally close to `far` the closest convention takes:
            "best" (highest TPR, InsightFace's IJB rule, the default) or "first" (lowest TPR, what
            a plain `np.argmin` over the ROC gives).
    """
    if not 0.0 < far <= 1.0:
        raise ValueError(f"FAR must be in (0, 1], got {far!r}")
    if ties not in ("first", "best"):
        raise ValueError(f"ties must be 'first' or 'best', got {ties!r}")
    gap = np.abs(curve.fpr - far)
    # The curve is sorted by (FPR, TPR), so among equally close points the last has the highest TPR:
    # InsightFace reverses the arrays and takes the first minimum, which is the same point.
    i = int(np.argmin(gap)) if ties == "first" else int(np.flatnonzero(gap == gap.min())[-1])
    # Upper envelope: the highest TPR at each distinct FPR (the curve is sorted, so the last one).
    last_of_run = np.r_[np.diff(curve.fpr) != 0, True]
    envelope_tar = float(np.interp(far, curve.fpr[last_of_run], curve.tpr[last_of_run]))
    return TarAtFar(
        far=float(far),
        tar_closest=float(curve.tpr[i]),
        fpr_closest=float(curve.fpr[i]),
        threshold_closest=float(curve.thresholds[i]),
        tar_interpolated=envelope_tar,
        resolved=far * curve.num_neg >= 1.0,
    )


def tar_at_fars(labels: np.ndarray, scores: np.ndarray, fars: Sequence[float]) -> tuple[RocCurve, list[TarAtFar]]:
    """ROC of the scores and TAR at each FAR in `fars` (InsightFace's convention and the interpolated one)."""
    curve = roc_curve(labels, scores)
    return curve, [tar_at_far(curve, f) for f in fars]


def auc(curve: RocCurve) -> float:
    """Area under the ROC (trapezoids)."""
    return float(np.trapezoid(curve.tpr, curve.fpr))
