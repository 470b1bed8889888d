"""Decision thresholds for "is this the enrolled person?" at a chosen false-accept rate.

A gallery accepts a match when ``cosine >= threshold``. The false-accept rate (FAR) of a threshold
is the fraction of impostor pairs (two different people) that would be accepted. Given impostor
scores from any labelled face set, ``threshold_at_far`` returns the lowest threshold whose FAR on
those scores is at most the target, with no interpolation: the answer is exact on the data given.

``DEFAULT_THRESHOLDS`` holds what a gallery uses before anyone calibrated. Each entry says where
its number comes from; none is measured on LVFace weights (nothing public reports one), so the
entries are honest starting points and ``calibrate`` is the way to get a real one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Calibration",
    "ThresholdDefault",
    "calibrate",
    "default_threshold",
    "far_at_threshold",
    "pair_scores",
    "register_default_threshold",
    "tar_at_threshold",
    "threshold_at_far",
]


@dataclass(frozen=True)
class ThresholdDefault:
    """A shipped default threshold and its provenance."""

    threshold: float
    source: str
    target_far: float | None = None  # the FAR it aims at, when it aims at one
    measured: bool = False  # True only when computed from real impostor scores of these weights

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"ThresholdDefault.threshold={self.threshold!r}: expected a cosine in [-1, 1]")
        if self.target_far is not None and not 0.0 < self.target_far < 1.0:
            raise ValueError(f"ThresholdDefault.target_far={self.target_far!r}: expected a rate in (0, 1)")
        if not self.source.strip():
            raise ValueError("ThresholdDefault.source must say where the number comes from")


@dataclass(frozen=True)
class Calibration:
    """The outcome of ``calibrate``: the threshold and what it does on the data it came from."""

    threshold: float
    target_far: float
    far: float  # FAR of `threshold` on the impostor scores used (<= target_far)
    tar: float | None  # fraction of genuine pairs accepted, when genuine pairs existed
    num_impostor: int
    num_genuine: int


DEFAULT_THRESHOLDS: dict[str, ThresholdDefault] = {}


def register_default_threshold(model_name: str, default: ThresholdDefault) -> None:
    if model_name in DEFAULT_THRESHOLDS:
        raise ValueError(f"a default threshold for {model_name!r} is already registered")
    DEFAULT_THRESHOLDS[model_name] = default


_LVFACE_SOURCE = (
    "not measured: no threshold for LVFace weights is published (the release documents none, and "
    "downstream projects pick cosine 0.35-0.6 by hand; reference/lvface.md section 9). 0.40 is taken "
    "from the low end of that hand-picked range and has not been checked against any FAR; calibrate "
    "on labelled faces of your own with lvface_mm.gallery.calibrate() to get one."
)

for _name in ("lvface_t", "lvface_s", "lvface_b", "lvface_l"):
    register_default_threshold(_name, ThresholdDefault(0.40, _LVFACE_SOURCE))

register_default_threshold(
    "lvface_tiny",
    ThresholdDefault(
        0.99,
        "random weights (tests and --tiny demos): a random ViT maps every face to nearly the same "
        "direction, so only a near-identical crop of an enrolled photo should be named.",
    ),
)

# Used when a gallery does not know which encoder made its embeddings.
FALLBACK_THRESHOLD = ThresholdDefault(0.40, "generic fallback, same reasoning as the LVFace entries: " + _LVFACE_SOURCE)


def default_threshold(model_name: str | None) -> ThresholdDefault:
    """The shipped default for ``model_name`` (or the generic fallback when unknown/None)."""
    if model_name is None:
        return FALLBACK_THRESHOLD
    return DEFAULT_THRESHOLDS.get(model_name, FALLBACK_THRESHOLD)


def _scores(values: np.ndarray | list[float], what: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{what} scores contain NaN or infinity")
    return scores


def far_at_threshold(impostor_scores: np.ndarray | list[float], threshold: float) -> float:
    """Fraction of impostor scores accepted (``score >= threshold``)."""
    scores = _scores(impostor_scores, "impostor")
    if len(scores) == 0:
        raise ValueError("need at least one impostor score")
    return float(np.count_nonzero(scores >= threshold) / len(scores))


def tar_at_threshold(genuine_scores: np.ndarray | list[float], threshold: float) -> float:
    """Fraction of genuine scores accepted (``score >= threshold``)."""
    scores = _scores(genuine_scores, "genuine")
    if len(scores) == 0:
        raise ValueError("need at least one genuine score")
    return float(np.count_nonzero(scores >= threshold) / len(scores))


def threshold_at_far(impostor_scores: np.ndarray | list[float], far: float, *,
                     allow_extrapolation: bool = False) -> float:
    """Lowest threshold t with ``mean(impostor >= t) <= far``.

    With N scores sorted high to low (s_1 >= s_2 >= ...), at most m = floor(far * N) impostors may
    pass, so t sits just above s_(m+1). Ties at that score are all rejected, which can make the
    achieved FAR lower than ``far`` but never higher.

    Args:
        impostor_scores: cosine scores of pairs of different people.
        far: target false-accept rate in (0, 1).
        allow_extrapolation: with fewer than 1/far scores no impostor may pass, so the answer is
            just above the highest score seen, which says little about the true FAR. Off by
            default: the error says how many scores are needed.

    Raises:
        ValueError: empty or non-finite scores, far outside (0, 1), or too few scores.
    """
    if not 0.0 < far < 1.0:
        raise ValueError(f"far={far!r}: expected a rate in (0, 1), e.g. 1e-4")
    scores = _scores(impostor_scores, "impostor")
    n = len(scores)
    if n == 0:
        raise ValueError("need at least one impostor score")
    needed = math.ceil(1.0 / far)
    if n < needed and not allow_extrapolation:
        raise ValueError(
            f"{n} impostor scores cannot resolve FAR={far:g}: need at least {needed} "
            "(or pass allow_extrapolation=True to take the threshold just above the highest score)"
        )
    allowed = int(math.floor(far * n + 1e-9))  # the epsilon keeps e.g. 0.1 * 1000 from flooring to 99
    ranked = np.sort(scores)[::-1]
    if allowed >= n:
        return float(ranked[-1])
    return float(np.nextafter(ranked[allowed], np.inf))


def pair_scores(embeddings: np.ndarray, labels: np.ndarray | list, *, max_pairs: int | None = None,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All cosine scores between distinct samples of a labelled set, split into (genuine, impostor).

    Args:
        embeddings: (N, D) embeddings; normalised here, so raw features are fine.
        labels: (N,) identity label per row (any hashable values).
        max_pairs: above this many pairs, a uniform random subset of pairs is scored instead.
        seed: seed for that subset.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"embeddings (N, D) and labels (N,) must match, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError("need at least two labelled embeddings to form a pair")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain a zero or non-finite row")
    x = x / norms
    n = len(x)
    total = n * (n - 1) // 2
    if max_pairs is not None and total > max_pairs:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, size=max_pairs * 2)
        j = rng.integers(0, n, size=max_pairs * 2)
        keep = i != j
        i, j = i[keep][:max_pairs], j[keep][:max_pairs]
    else:
        i, j = np.triu_indices(n, k=1)
    scores = np.einsum("nd,nd->n", x[i], x[j])
    same = y[i] == y[j]
    return scores[same], scores[~same]


def calibrate(embeddings: np.ndarray, labels: np.ndarray | list, far: float = 1e-3, *,
              max_pairs: int | None = 5_000_000, allow_extrapolation: bool = False) -> Calibration:
    """Threshold at ``far`` from the impostor pairs of a labelled set, with the TAR it achieves."""
    genuine, impostor = pair_scores(embeddings, labels, max_pairs=max_pairs)
    if len(impostor) == 0:
        raise ValueError("the labelled set has a single identity: no impostor pairs to calibrate on")
    t = threshold_at_far(impostor, far, allow_extrapolation=allow_extrapolation)
    return Calibration(
        threshold=t,
        target_far=far,
        far=far_at_threshold(impostor, t),
        tar=tar_at_threshold(genuine, t) if len(genuine) else None,
        num_impostor=len(impostor),
        num_genuine=len(genuine),
    )
