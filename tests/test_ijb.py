"""IJB-B/C: protocol loading, template pooling, 1:1 and 1:N scoring, end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lvface_mm.data import IJBAlignedFaces, load_ijb
from lvface_mm.eval import (
    evaluate_ijb,
    extract_embeddings,
    image_features,
    pair_scores,
    search_gallery,
    template_features,
)
from lvface_mm.models import create_model
from tests._datasets_and_eval_fixtures import write_ijb_folder


def test_image_features_modes():
    emb = np.array([[3.0, 4.0], [1.0, 0.0]])
    flipped = np.array([[1.0, 0.0], [0.0, 1.0]])
    scores = np.array([0.5, 2.0])
    np.testing.assert_allclose(image_features(emb, flipped, scores), [[2.0, 2.0], [2.0, 2.0]])
    np.testing.assert_allclose(image_features(emb, None, None), emb)
    normed = image_features(emb, None, scores, normalize_images=True)
    np.testing.assert_allclose(normed, [[0.3, 0.4], [2.0, 0.0]])


def test_template_pooling_averages_media_then_sums():
    # Template 7: media 1 has two images (mean [2, 0]), media 2 one image [0, 2] -> sum [2, 2].
    # Template 3: one image. Raw norms matter inside a media (mean) and across media (sum).
    feats = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -5.0]])
    templates = np.array([7, 7, 7, 3])
    medias = np.array([1, 2, 1, 9])
    ids, pooled = template_features(feats, templates, medias)
    np.testing.assert_array_equal(ids, [3, 7])
    np.testing.assert_allclose(pooled, [[0.0, -1.0], [np.sqrt(0.5), np.sqrt(0.5)]])
    scores = pair_scores(ids, pooled, np.array([[7, 3], [7, 7]]))
    np.testing.assert_allclose(scores, [-np.sqrt(0.5), 1.0])
    with pytest.raises(ValueError, match="without features"):
        pair_scores(ids, pooled, np.array([[7, 5]]))


def test_gallery_search_known_answers():
    # 3 gallery subjects along the axes; probes of subjects 10 and 20 are mated, 99 is not.
    gallery = np.eye(3)
    gallery_subjects = np.array([10, 20, 30])
    probes = np.array([
        [0.9, 0.1, 0.0],   # subject 10, rank 1, score 0.9
        [0.6, 0.5, 0.0],   # subject 20, rank 2 (subject 10 scores higher)
        [0.0, 0.2, 0.3],   # subject 30, rank 1, score 0.3
        [0.0, 0.0, 0.5],   # subject 99 (not enrolled): top score 0.5
        [0.7, 0.0, 0.0],   # subject 98 (not enrolled): top score 0.7
    ])
    probe_subjects = np.array([10, 20, 30, 99, 98])
    result = search_gallery(probes, probe_subjects, gallery, gallery_subjects, ranks=(1, 2), fpirs=(0.5, 1.0))
    assert (result.mated, result.non_mated) == (3, 2)
    assert result.rank_hits == {1: 2, 2: 3}
    # FPIR 0.5 of 2 non-mated: threshold = 2nd highest top score (0.5): only the 0.9 rank-1 mate passes.
    assert result.thresholds[0.5] == 0.5 and result.tpir[0.5] == pytest.approx(1 / 3)
    # FPIR 1.0: no threshold; every rank-1 mate counts.
    assert result.tpir[1.0] == pytest.approx(2 / 3)


def test_gallery_subject_with_several_templates_scores_its_best():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    result = search_gallery(np.array([[0.0, 1.0]]), np.array([5]), gallery, np.array([5, 6, 5]), ranks=(1,))
    assert result.rank_hits == {1: 0}  # subject 6 (1.0) beats subject 5's best template (0.8)
    result = search_gallery(np.array([[0.6, 0.8]]), np.array([5]), gallery, np.array([5, 6, 5]), ranks=(1,))
    assert result.rank_hits == {1: 1}


def test_loader_counts_join_and_errors(tmp_path):
    expected = write_ijb_folder(tmp_path / "IJB", "IJBC")
    protocol = load_ijb(tmp_path / "IJB", "ijbc")
    counts = protocol.counts()
    for key in ("images", "templates", "pairs", "genuine", "probe_templates", "gallery_templates"):
        assert counts[key] == expected[key], key
    # Landmarks were written in reverse order; they are joined by name.
    i = list(protocol.image_names).index("1.jpg")
    assert protocol.scores[i] == pytest.approx(0.5 + 0.5 * (1 / 2))
    assert [g.name for g in protocol.galleries] == ["G1", "G2"]
    np.testing.assert_array_equal(protocol.galleries[0].subjects, [1, 3, 5])
    # The target folder itself works as root as well.
    assert load_ijb(tmp_path / "IJB" / "IJBC", "IJBC").counts() == counts

    meta = tmp_path / "IJB" / "IJBC" / "meta"
    lm = meta / "ijbc_name_5pts_score.txt"
    lm.write_text("\n".join(lm.read_text().splitlines()[1:]) + "\n")  # drop one image's landmarks
    with pytest.raises(ValueError, match="no landmarks for 1 images"):
        load_ijb(tmp_path / "IJB", "IJBC")
    pairs = meta / "ijbc_template_pair_label.txt"
    pairs.write_text("1 2 1\n3 x 0\n")
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label\.txt:2: expected 3 integers"):
        load_ijb(tmp_path / "IJB", "IJBC")
    with pytest.raises(FileNotFoundError, match="no IJB meta folder"):
        load_ijb(tmp_path / "IJB", "IJBB")
    with pytest.raises(ValueError, match="IJB target must be"):
        load_ijb(tmp_path / "IJB", "IJBD")


def test_one_to_n_csv_problems_are_named(tmp_path):
    write_ijb_folder(tmp_path / "IJB", "IJBB")
    meta = tmp_path / "IJB" / "IJBB" / "meta"
    (meta / "ijbb_1N_gallery_S2.csv").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete 1:N protocol.*ijbb_1N_gallery_S2"):
        load_ijb(tmp_path / "IJB", "IJBB")
    assert load_ijb(tmp_path / "IJB", "IJBB", one_to_n=False).galleries == ()
    (meta / "ijbb_1N_gallery_S2.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n1,1\n1,2\n")
    with pytest.raises(ValueError, match="template 1 is listed with more than one SUBJECT_ID"):
        load_ijb(tmp_path / "IJB", "IJBB")
    (meta / "ijbb_1N_gallery_S2.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n999,1\n")
    with pytest.raises(ValueError, match="template 999 has no images"):
        load_ijb(tmp_path / "IJB", "IJBB")


def test_synthetic_ijb_end_to_end_on_tiny_model(tmp_path):
    write_ijb_folder(tmp_path / "IJB", "IJBC")
    protocol = load_ijb(tmp_path / "IJB", "IJBC")
    faces = IJBAlignedFaces(protocol)
    crop = faces[0]
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    torch.manual_seed(0)
    model = create_model("lvface_tiny")
    emb = extract_embeddings(model, faces, batch_size=64, progress=False)
    result = evaluate_ijb(protocol, emb.plain, emb.flipped)
    # Every image of a subject is the same picture, so genuine templates score exactly 1.
    genuine = {t.far: t for t in result.tar}
    assert genuine[1e-1].tar_closest == 1.0 and all(t.tar_interpolated == 1.0 for t in result.tar)
    # InsightFace's rule (highest TPR among equally close ROC points): perfect at every FAR, even where
    # the closest FPR is 0 and the lowest point there is the (0, 0) start.
    assert all(t.tar_closest == 1.0 for t in result.tar)
    assert result.identification.rank_accuracy[1] == 1.0
    assert all(v == 1.0 for v in result.identification.tpir.values())
    assert [g.mated for g in result.identification.galleries] == [6, 6]  # 3 subjects x 2 probes each
    report = result.to_dict()
    json.dumps(report)  # serialisable
    assert report["counts"]["pairs"] == len(protocol.labels)
