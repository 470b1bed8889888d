"""10-fold verification, ROC and TAR@FAR on constructed embeddings and scores with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvface_mm.eval import (
    DISTANCE_THRESHOLDS,
    accuracy_per_threshold,
    evaluate_verification,
    extract_embeddings,
    kfold_indices,
    l2_normalize,
    pair_distances,
    roc_curve,
    tar_at_far,
    ten_fold_accuracy,
)
from lvface_mm.models import create_model
from tests._datasets_and_eval_fixtures import pattern_image


def _pairs(num_pairs: int, issame: np.ndarray, dim: int = 64, seed: int = 0) -> np.ndarray:
    """(2N, D) embeddings: genuine pairs share a direction, impostor pairs are orthogonal."""
    rng = np.random.default_rng(seed)
    emb = np.zeros((2 * num_pairs, dim), dtype=np.float32)
    for i in range(num_pairs):
        a = rng.normal(size=dim)
        b = a if issame[i] else rng.normal(size=dim)
        if not issame[i]:
            b -= a * (a @ b) / (a @ a)  # exactly orthogonal: squared distance 2
        emb[2 * i], emb[2 * i + 1] = a * rng.uniform(0.5, 3), b * rng.uniform(0.5, 3)
    return emb


def _reference_protocol(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference loop: every threshold, np.less, argmax over 9 folds, accuracy on the 10th."""
    folds = np.array_split(np.arange(len(dist)), 10)
    accs, thrs = [], []
    for k in range(10):
        test = folds[k]
        train = np.concatenate([folds[j] for j in range(10) if j != k])
        train_acc = [np.mean(np.less(dist[train], t) == issame[train]) for t in DISTANCE_THRESHOLDS]
        best = DISTANCE_THRESHOLDS[int(np.argmax(train_acc))]
        accs.append(np.mean(np.less(dist[test], best) == issame[test]))
        thrs.append(best)
    return np.array(accs), np.array(thrs)


def test_kfold_is_contiguous_like_kfold_without_shuffle():
    folds = kfold_indices(6000)
    assert [len(test) for _, test in folds] == [600] * 10
    np.testing.assert_array_equal(folds[3][1], np.arange(1800, 2400))
    assert set(folds[3][0]) == set(range(6000)) - set(range(1800, 2400))
    assert [len(test) for _, test in kfold_indices(23)] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    with pytest.raises(ValueError):
        kfold_indices(5)


def test_vectorised_threshold_sweep_equals_the_loop():
    rng = np.random.default_rng(1)
    dist = np.round(rng.uniform(0, 4, size=700), 2).astype(np.float32)  # many distances exactly on the grid
    issame = rng.random(700) < 0.5
    fast = accuracy_per_threshold(dist, issame, DISTANCE_THRESHOLDS)
    slow = np.array([np.mean(np.less(dist, t) == issame) for t in DISTANCE_THRESHOLDS])
    np.testing.assert_array_equal(fast, slow)


def test_ten_fold_matches_the_reference_loop_on_noisy_distances():
    rng = np.random.default_rng(2)
    issame = rng.random(1000) < 0.5
    dist = np.where(issame, rng.normal(0.9, 0.35, 1000), rng.normal(1.7, 0.35, 1000)).clip(0, 4).astype(np.float32)
    result = ten_fold_accuracy(dist, issame)
    accs, thrs = _reference_protocol(dist, issame)
    np.testing.assert_array_equal(result.fold_accuracies, accs)
    np.testing.assert_array_equal(result.fold_thresholds, thrs)
    assert 0.8 < result.mean < 0.95
    assert result.std == pytest.approx(np.std(accs))


def test_perfectly_separable_pairs_give_100_percent():
    issame = np.tile([True, False], 300)
    emb = _pairs(600, issame)
    result = evaluate_verification(emb, emb.copy(), issame, fars=(1e-2, 1e-3))
    assert result.flip.mean == 1.0 and result.flip.std == 0.0
    assert result.plain.mean == 1.0
    # Genuine distance 0, impostor 2: the first threshold above 0 with full accuracy on the train folds.
    assert result.flip.threshold == pytest.approx(0.01)
    assert result.flip.cosine_threshold == pytest.approx(1 - 0.01 / 2)
    assert all(t.tar_closest == 1.0 and t.tar_interpolated == 1.0 for t in result.tar)
    assert [t.resolved for t in result.tar] == [True, False]  # 300 impostors cannot measure 1e-3
    # Lowest-TPR-on-ties on the same scores lands on the (0, 0) start point at 1e-3 (see roc.py).
    curve = roc_curve(issame, 1 - pair_distances(l2_normalize(emb)) / 2)
    assert tar_at_far(curve, 1e-3, ties="first").tar_closest == 0.0
    assert tar_at_far(curve, 1e-3).tar_closest == 1.0  # InsightFace's rule, the default


def test_known_fraction_of_swapped_labels_gives_matching_accuracy():
    # 6000 pairs; in every fold of 600, exactly 6 labels are swapped: each fold scores 99.0%.
    rng = np.random.default_rng(3)
    truth = rng.random(6000) < 0.5
    emb = _pairs(6000, truth, dim=16, seed=4)
    labels = truth.copy()
    for _, test in kfold_indices(6000):
        labels[rng.choice(test, 6, replace=False)] ^= True
    result = evaluate_verification(emb, None, labels)
    np.testing.assert_allclose(result.flip.fold_accuracies, 0.99)
    assert result.plain.mean == pytest.approx(0.99) and result.flip.std == pytest.approx(0.0, abs=1e-12)


def test_flip_sum_is_reported_separately_from_plain():
    # Each view carries noise that the other view cancels: flip-sum is perfect, a single view is not.
    rng = np.random.default_rng(5)
    issame = np.tile([True, False], 500)
    clean = _pairs(1000, issame, dim=32, seed=6)
    clean /= np.linalg.norm(clean, axis=1, keepdims=True)
    noise = rng.normal(scale=0.6, size=clean.shape).astype(np.float32)
    result = evaluate_verification(clean + noise, clean - noise, issame)
    assert result.flip.mean == 1.0
    assert result.plain.mean < 0.99
    assert result.xnorm == pytest.approx(np.mean([np.linalg.norm(clean + noise, axis=1).mean(),
                                                  np.linalg.norm(clean - noise, axis=1).mean()]), rel=1e-6)
    d = result.to_dict()
    assert d["accuracy_flip"]["mean"] == 1.0 and len(d["accuracy"]["folds"]) == 10
    # A set of genuine pairs only still gets its accuracy; ROC and TAR@FAR are undefined and left out.
    only_genuine = evaluate_verification(clean + noise, clean - noise, np.ones(1000, bool))
    assert only_genuine.roc is None and only_genuine.tar == () and 0 < only_genuine.flip.mean <= 1


def test_roc_curve_against_brute_force():
    rng = np.random.default_rng(7)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + labels, 1)  # many ties
    curve = roc_curve(labels, scores, drop_intermediate=False)
    for t, fpr, tpr in zip(curve.thresholds[1:], curve.fpr[1:], curve.tpr[1:]):
        accepted = scores >= t
        assert fpr == pytest.approx(np.mean(accepted[~labels]))
        assert tpr == pytest.approx(np.mean(accepted[labels]))
    assert (curve.fpr[0], curve.tpr[0]) == (0, 0) and curve.fpr[-1] == 1 and curve.tpr[-1] == 1
    dropped = roc_curve(labels, scores)
    # Dropping collinear points keeps the corners only, so the area is unchanged.
    full_points = set(zip(curve.fpr.tolist(), curve.tpr.tolist()))
    assert set(zip(dropped.fpr.tolist(), dropped.tpr.tolist())) <= full_points
    assert len(dropped.fpr) < len(curve.fpr)
    assert np.trapezoid(dropped.tpr, dropped.fpr) == pytest.approx(np.trapezoid(curve.tpr, curve.fpr))


def test_tar_at_far_known_values_and_duplicate_fars():
    # 10 genuine, 1000 impostors. Impostor scores: 5 at 0.9 (a tie), the rest below every genuine score.
    genuine = np.round(np.linspace(0.5, 0.95, 10), 2)  # includes exactly 0.9
    impostor = np.r_[np.full(5, 0.9), np.linspace(0.0, 0.4, 995)]
    labels = np.r_[np.ones(10, bool), np.zeros(1000, bool)]
    curve = roc_curve(labels, np.r_[genuine, impostor])
    # Curve (collinear points dropped): (0,0) (0,.1) (.005,.2) (.005,1) (1,1); scores >= 0.9 accept
    # 2 genuine and the 5 tied impostors, so the FPR jumps from 0 to 0.005.
    at_1e3 = tar_at_far(curve, 1e-3, ties="first")
    # Closest FPR is 0, first point there is the (0, 0) start: ties="first" gives 0.
    assert at_1e3.tar_closest == 0.0 and at_1e3.fpr_closest == 0.0
    assert at_1e3.tar_interpolated == pytest.approx(0.1 + (1.0 - 0.1) * (1e-3 / 5e-3))  # upper envelope
    at_1e2 = tar_at_far(curve, 1e-2, ties="first")
    # Closest FPR is 0.005; the first point there is the bottom of the vertical step.
    assert at_1e2.tar_closest == pytest.approx(0.2) and at_1e2.fpr_closest == pytest.approx(0.005)
    assert at_1e2.threshold_closest == pytest.approx(0.9)
    assert at_1e2.tar_interpolated == pytest.approx(1.0)
    assert at_1e3.resolved and at_1e2.resolved and not tar_at_far(curve, 1e-4).resolved
    # Many exactly equal FARs (a plateau of ties) must not break the interpolation.
    plateau = roc_curve(np.r_[np.ones(50, bool), np.zeros(50, bool)], np.r_[np.full(50, 0.7), np.full(50, 0.7)])
    t = tar_at_far(plateau, 0.3)
    assert t.tar_interpolated == pytest.approx(0.3) and t.resolved
    # The default (InsightFace): of the points equally close to the target, the highest TPR.
    assert tar_at_far(curve, 1e-2).tar_closest == pytest.approx(1.0)
    assert tar_at_far(curve, 1e-3).tar_closest == pytest.approx(0.1)
    with pytest.raises(ValueError, match="genuine and impostor"):
        roc_curve(np.ones(4, bool), np.arange(4.0))
    with pytest.raises(ValueError, match="NaN"):
        roc_curve(np.r_[True, False], np.r_[0.1, np.nan])


def test_extraction_resumes_after_an_interruption(tmp_path):
    torch.manual_seed(0)
    model = create_model("lvface_tiny").eval()
    crops = [pattern_image(i) for i in range(7)]
    full = extract_embeddings(model, crops, batch_size=7, progress=False)
    assert full.plain.shape == (7, 512) and full.flipped.shape == (7, 512)
    assert not np.allclose(full.plain, full.flipped)

    class Interrupting:
        """Raises part-way through, like Ctrl-C during a long extraction; counts reads."""

        def __init__(self, fail_at: int | None) -> None:
            self.fail_at, self.reads = fail_at, []

        def __len__(self) -> int:
            return len(crops)

        def __getitem__(self, i: int) -> np.ndarray:
            if i == self.fail_at:
                raise KeyboardInterrupt
            self.reads.append(i)
            return crops[i]

    cache = tmp_path / "emb.npy"
    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(model, Interrupting(5), batch_size=4, cache_path=cache, cache_key="k", progress=False)
    resumed = Interrupting(None)
    got = extract_embeddings(model, resumed, batch_size=4, cache_path=cache, cache_key="k", progress=False)
    assert resumed.reads == [4, 5, 6]  # batch [0-3] was saved; the rest is recomputed
    np.testing.assert_allclose(got.plain, full.plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.flipped, full.flipped, rtol=1e-5, atol=1e-6)
    again = Interrupting(None)
    extract_embeddings(model, again, batch_size=4, cache_path=cache, cache_key="k", progress=False)
    assert again.reads == []  # complete cache: nothing recomputed
    # A different key never reuses the cache: it starts again from image 0.
    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(model, Interrupting(0), batch_size=4, cache_path=cache, cache_key="other", progress=False)


def _insightface_tar(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    """InsightFace's IJB rule as `eval_ijbc.py` describes it: reverse the ROC ("select largest tpr at
    same fpr"), then the first point of smallest |FPR - target| in that order."""
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, index = min(zip(np.abs(fpr - far).tolist(), range(len(fpr))))
    return float(tpr[index])


@pytest.mark.parametrize("seed", range(4))
def test_tar_at_far_default_is_insightface_rule_on_tied_scores(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(4000) < 0.4
    # Scores rounded to 2 decimals: long runs of equal scores make vertical steps and equal FPRs.
    scores = np.round(rng.normal(size=4000) * 0.3 + labels * 0.8, 2)
    curve = roc_curve(labels, scores)
    assert len(np.unique(curve.fpr)) < len(curve.fpr)  # the curve does have points sharing an FPR
    differs = 0
    for far in np.r_[1e-4, 3e-4, 1e-3, np.unique(curve.fpr)[1:8], 1e-2, 0.1, 0.5]:
        expected = _insightface_tar(curve.fpr, curve.tpr, float(far))
        assert tar_at_far(curve, float(far)).tar_closest == expected
        differs += tar_at_far(curve, float(far), ties="first").tar_closest != expected
    assert differs > 0  # the two tie rules do disagree on this data, so the test can tell them apart
    # evaluate_verification reports the same rule (on the ROC without dropped points).
    emb = rng.normal(size=(2 * len(labels[:600]), 8)).astype(np.float32)
    result = evaluate_verification(emb, None, labels[:600], fars=(1e-2, 0.1))
    for t in result.tar:
        assert t.tar_closest == _insightface_tar(result.roc.fpr, result.roc.tpr, t.far)
