"""Harness pieces that need no trained model: prompts per mode, the calibrated gallery, the
fixed-size training items, and generation plumbing on a tiny random model."""

from __future__ import annotations

import pytest

from lvface_mm.vqa.builder import UNKNOWN_PERSON, VQABuildConfig, build_vqa
from lvface_mm.vqa.data import IGNORE_INDEX, FaceStore
from lvface_mm.vqa.harness import (
    HarnessConfig,
    build_gallery,
    gallery_names,
    plain_sample,
    subsample,
)
from lvface_mm.vqa.rendering import RenderedDataset, SampleRenderer
from lvface_mm.vqa.schema import load_samples
from lvface_mm.vqa.sources import embedding_cluster_photos


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa")
    config = VQABuildConfig(
        seed=2,
        num_train_unknown=2,
        num_eval_unknown=2,
        train_per_task=40,
        eval_per_task=20,
        tasks=("naming", "unknown", "caption"),
    )
    build_vqa(embedding_cluster_photos(12, 5, dim=64, seed=3), out, config)
    return out, load_samples(out / "train.json"), load_samples(out / "eval.json")


@pytest.fixture(scope="module")
def vlm():
    from tests._vlm_fixtures import tiny_identity_vlm

    return tiny_identity_vlm("causal_lm", encoder="lvface_tiny")


def test_gallery_names_known_faces_and_marks_unknown_ones(dataset, vlm):
    out, train, evaluation = dataset
    faces = FaceStore.open(out, "embedding")
    gallery = build_gallery(train, faces, far=1e-3)
    assert len(gallery) == 8  # the enrolled people, from training photos only
    renderer = SampleRenderer(vlm, out, "prompt")
    names = gallery_names(vlm, evaluation, faces, gallery)
    checked = 0
    for s in evaluation:
        if not s.faces:
            continue
        # well-separated clusters: every enrolled person is recognised, nobody else
        assert names[s.id] == [f.name for f in s.faces]
        text, images, _ = renderer.prompt(s, names[s.id])
        assert images is None and "<face" not in text and text.count("- face ") == len(s.faces)
        for f in s.faces:
            assert (f.name in text) if f.name else (UNKNOWN_PERSON in text)
        checked += 1
    assert checked >= 40


def test_plain_prompts_carry_no_identity(dataset):
    _, _, evaluation = dataset
    s = next(x for x in evaluation if len(x.faces) == 2)
    plain = plain_sample(s)
    assert "<face" not in plain.turns[0].text and plain.answer == s.answer
    assert plain.turns[0].text == s.turns[0].text  # builder samples hold the question only
    assert len(subsample(evaluation, 3)) == 9
    with pytest.raises(ValueError, match="unknown mode"):
        HarnessConfig(modes=("token", "psychic"))


def test_dataset_items_are_fixed_size(dataset, vlm):
    out, train, _ = dataset
    pad = vlm.processor.tokenizer.pad_token_id
    ds = RenderedDataset(train, SampleRenderer(vlm, out, "token"), FaceStore.open(out, "embedding"), pad_id=pad)
    a, b = ds[0], ds[len(ds) - 1]
    for key in a:
        assert a[key].shape == b[key].shape, key
    assert a["faces"].shape == (ds.max_faces, 64)
    n = int(a["attention_mask"].sum())
    assert (a["labels"][n:] == IGNORE_INDEX).all() and (a["input_ids"][n:] == pad).all()
    assert int(a["face_mask"].sum()) == len(train[0].faces)
