"""Harness pieces that need no trained model: prompts per mode, the calibrated gallery, the
conversation encoder's assistant-only labels, and generation plumbing on a tiny random model."""

from __future__ import annotations

import pytest

from lvface_mm.vqa.builder import UNKNOWN_PERSON, VQABuildConfig, build_vqa
from lvface_mm.vqa.data import IGNORE_INDEX, ConversationEncoder, FaceStore, VQADataset
from lvface_mm.vqa.harness import (
    HarnessConfig,
    build_gallery,
    gallery_names,
    plain_sample,
    subsample,
)
from lvface_mm.vqa.rendering import SampleRenderer
from lvface_mm.vqa.schema import load_samples, validate_samples
from lvface_mm.vqa.sources import embedding_cluster_photos
from lvface_mm.vqa.testing import tiny_tokenizer_with_words


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


def test_gallery_names_known_faces_and_marks_unknown_ones(dataset):
    from tests._vlm_fixtures import tiny_identity_vlm

    out, train, evaluation = dataset
    faces = FaceStore.open(out, "embedding")
    gallery = build_gallery(train, faces, far=1e-3)
    assert len(gallery) == 8  # the enrolled people, from training photos only
    vlm = tiny_identity_vlm("causal_lm", encoder="lvface_tiny")
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


def test_encoder_labels_only_assistant_turns():
    raw = {
        "id": "m1",
        "task": "other",
        "faces": [{"embedding": 0}, {"embedding": 1}],
        "conversations": [
            {"from": "system", "value": "Be brief ."},
            {"from": "human", "value": "Faces : <face_1> and <face_0> . Who is left ?"},
            {"from": "gpt", "value": "Alice ."},
            {"from": "human", "value": "And <face_1> ?"},
            {"from": "gpt", "value": "Bob ."},
        ],
    }
    sample = validate_samples([raw])[0]
    tokenizer = tiny_tokenizer_with_words(["Be", "brief", "Faces", "Who", "left", "And", "Alice", "Bob", "<face>"])
    enc = ConversationEncoder(tokenizer, "<face>", num_id_tokens=3)
    e = enc.encode(sample)
    face_id = tokenizer.convert_tokens_to_ids("<face>")
    assert e.input_ids.count(face_id) == 3 * 3 and e.face_order == [1, 0, 1]
    answer_tokens = [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # both answers and their end-of-turn markers are labelled, nothing else
    assert tokenizer.decode(answer_tokens, skip_special_tokens=True).split() == ["Alice", ".", "Bob", "."]
    assert answer_tokens.count(end) == 2 and end in enc.end_of_turn_ids
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(e.input_ids, e.labels))
    prompt = enc.encode_prompt(sample)
    assert prompt.face_order == [1, 0, 1] and tokenizer.decode(prompt.input_ids).endswith("assistant")
    assert e.input_ids[: len(prompt.input_ids)] == prompt.input_ids


def test_dataset_items_are_fixed_size(dataset):
    out, train, _ = dataset
    tokenizer = tiny_tokenizer_with_words([w for s in train for t in s.turns for w in t.text.split()])
    from lvface_mm.vlm.processing import add_placeholder_token

    add_placeholder_token(tokenizer, "<face>")
    ds = VQADataset(train, ConversationEncoder(tokenizer, "<face>", 2), FaceStore.open(out, "embedding"), pad_id=0)
    a, b = ds[0], ds[len(ds) - 1]
    for key in a:
        assert a[key].shape == b[key].shape, key
    assert a["faces"].shape == (ds.max_faces, 64)
    n = int(a["attention_mask"].sum())
    assert (a["labels"][n:] == IGNORE_INDEX).all() and (a["input_ids"][n:] == 0).all()
    assert int(a["face_mask"].sum()) == len(train[0].faces)
