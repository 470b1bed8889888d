"""Thresholds at a target FAR, on score distributions whose FAR is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lvface_mm.gallery import (
    DEFAULT_THRESHOLDS,
    calibrate,
    default_threshold,
    far_at_threshold,
    pair_scores,
    tar_at_threshold,
    threshold_at_far,
)


def test_exact_on_a_known_grid():
    # 1000 distinct impostor scores 0.000 .. 0.999: FAR(t) is exactly (#scores >= t) / 1000.
    scores = np.arange(1000) / 1000.0
    for far, allowed in [(0.1, 100), (0.01, 10), (0.001, 1), (0.0255, 25)]:
        t = threshold_at_far(scores, far)
        assert far_at_threshold(scores, t) == allowed / 1000
        # the lowest such threshold: one step down accepts one more impostor, exceeding the target
        assert far_at_threshold(scores, np.nextafter(sorted(scores)[-allowed - 1], -np.inf)) > far


def test_ties_never_exceed_the_target():
    scores = np.array([0.9] * 5 + [0.1] * 995)
    t = threshold_at_far(scores, 0.003)  # 3 may pass, but five share the top score
    assert t > 0.9 and far_at_threshold(scores, t) == 0.0
    t = threshold_at_far(scores, 0.005)
    assert far_at_threshold(scores, t) == 0.005


def test_matches_gaussian_quantile():
    # Impostor cosines ~ N(0, 0.1): the threshold at FAR 1e-3 is 0.1 * z(0.999) = 0.30902.
    rng = np.random.default_rng(0)
    scores = rng.normal(0.0, 0.1, size=2_000_000)
    t = threshold_at_far(scores, 1e-3)
    assert t == pytest.approx(0.1 * 3.090232, abs=0.004)
    far = far_at_threshold(scores, t)
    assert far <= 1e-3 and far > 0.9e-3


def test_refuses_too_few_scores_and_bad_values():
    with pytest.raises(ValueError, match="need at least 10000"):
        threshold_at_far(np.zeros(50), 1e-4)
    t = threshold_at_far(np.array([0.2, 0.5]), 1e-4, allow_extrapolation=True)
    assert t > 0.5 and far_at_threshold([0.2, 0.5], t) == 0.0
    with pytest.raises(ValueError, match="far=0"):
        threshold_at_far([0.1], 0)
    with pytest.raises(ValueError, match="NaN"):
        threshold_at_far([0.1, math.nan], 0.5)


def test_calibrate_on_a_labelled_set():
    # 50 identities x 4 samples: within-identity vectors are close, across identities random.
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(50, 128))
    x = np.repeat(centres, 4, axis=0) + 0.3 * rng.normal(size=(200, 128))
    labels = np.repeat(np.arange(50), 4)
    genuine, impostor = pair_scores(x, labels)
    assert len(genuine) == 50 * 6 and len(impostor) == 200 * 199 // 2 - 300
    cal = calibrate(x, labels, far=1e-3)
    assert cal.far <= 1e-3 and cal.num_impostor == len(impostor)
    assert cal.tar == tar_at_threshold(genuine, cal.threshold) and cal.tar > 0.99
    with pytest.raises(ValueError, match="single identity"):
        calibrate(x[:4], labels[:4], far=0.5)
    g2, i2 = pair_scores(x, labels, max_pairs=1000)
    assert len(g2) + len(i2) == 1000


def test_shipped_defaults_state_their_source():
    for name in ("lvface_t", "lvface_s", "lvface_b", "lvface_l", "lvface_tiny"):
        d = DEFAULT_THRESHOLDS[name]
        assert -1 <= d.threshold <= 1 and len(d.source) > 40
        assert d.measured is False  # nothing shipped is measured on real weights: it must not claim so
    assert default_threshold("unknown-model").threshold == default_threshold(None).threshold
