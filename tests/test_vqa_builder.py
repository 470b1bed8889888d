"""VQA builder: identity and photo splits never leak into training, outputs validate, builds are
deterministic, RAP-style negatives keep the answer, and nothing already saved is overwritten."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lvface_mm.vqa.builder import ABSTAIN_ANSWER, VQABuildConfig, build_vqa, check_splits, load_manifest
from lvface_mm.vqa.schema import check_files, load_samples
from lvface_mm.vqa.sources import embedding_cluster_photos, embedding_table_photos, synthetic_photos

CONFIG = VQABuildConfig(
    seed=3, num_train_unknown=3, num_eval_unknown=3, train_per_task=60, eval_per_task=30, negative_context_prob=0.5
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa")
    photos = embedding_cluster_photos(num_identities=16, photos_per_identity=5, dim=32, seed=1)
    attributes = {f"id_{i:04d}": {"favourite colour": c} for i, c in enumerate(["red", "blue", "green"] * 6)}
    manifest = build_vqa(photos, out, replace(CONFIG, attributes=attributes))
    return out, manifest, load_samples(out / "train.json"), load_samples(out / "eval.json")


def test_splits_never_leak(built):
    _, manifest, train, evaluation = built
    train_photos = {f.photo for s in train for f in s.faces}
    eval_photos = {f.photo for s in evaluation for f in s.faces}
    assert train_photos and eval_photos and not train_photos & eval_photos
    train_ids = {f.identity for s in train for f in s.faces}
    eval_ids = {f.identity for s in evaluation for f in s.faces}
    assert not train_ids & set(manifest["eval_unknown"])  # split by identity
    assert set(manifest["eval_unknown"]) <= eval_ids  # ... and they are really used in evaluation
    assert not eval_ids & set(manifest["train_unknown"])
    enrolled = manifest["enrolled"]
    assert len(enrolled) == 16 - 6
    # every enrolled person is both trained on and evaluated, on different photos
    assert set(enrolled) <= train_ids and set(enrolled) <= eval_ids
    assert manifest["num_eval_photos"] == len(enrolled) * 1 + 3 * 5
    # a name is only ever given to an enrolled identity, and never to an unknown one
    for s in train + evaluation:
        for f in s.faces:
            assert f.name == enrolled.get(f.identity)


def test_check_splits_catches_leaks(built):
    _, manifest, train, evaluation = built
    with pytest.raises(AssertionError, match="evaluation photo"):
        check_splits(train + evaluation[:1], evaluation, manifest["eval_unknown"])
    unknown_eval = next(s for s in evaluation if any(f.identity in manifest["eval_unknown"] for f in s.faces))
    with pytest.raises(AssertionError, match="evaluation-only identities"):
        check_splits(train + [unknown_eval], [], manifest["eval_unknown"])


def test_tasks_targets_and_negatives(built):
    out, manifest, train, evaluation = built
    counts = manifest["tasks"]["train"]
    assert counts == {t: 60 for t in CONFIG.tasks} and manifest["tasks"]["eval"]["naming"] == 30
    vocabulary = set(manifest["vocabulary"])
    negatives = 0
    for s in train + evaluation:
        present = set(s.names_present())
        if s.task == "recognition":
            assert (s.target["query"] in present) == (s.target["answer"] == "yes")
            assert s.answer.startswith("Yes" if s.target["answer"] == "yes" else "No")
        elif s.task == "naming":
            assert s.target["names"][0] in s.answer and s.faces[s.meta["face"]].name == s.target["names"][0]
        elif s.task == "unknown":
            assert s.answer == ABSTAIN_ANSWER and s.faces[s.meta["face"]].name is None
        elif s.task == "counting":
            assert s.target["count"] == len(s.faces) and str(len(s.faces)) in s.answer
        elif s.task == "caption":
            assert s.target["names"] == [f.name for f in s.faces if f.name]
        elif s.task == "text_qa":
            assert not s.faces and s.target["answer"] in s.answer
        if "distractors" in s.meta:
            negatives += 1
            # RAP-style negative: names shown in the prompt are nobody in the photo, and the answer
            # never repeats them
            assert not set(s.meta["distractors"]) & present
            assert set(s.meta["distractors"]) <= vocabulary
            assert not any(d in s.answer for d in s.meta["distractors"])
    assert negatives > 50
    check_files(train + evaluation, out, num_embeddings=manifest["embeddings"]["rows"])


def test_deterministic_and_never_overwrites(tmp_path, built):
    out, _, _, _ = built
    photos = embedding_cluster_photos(num_identities=16, photos_per_identity=5, dim=32, seed=1)
    attributes = {f"id_{i:04d}": {"favourite colour": c} for i, c in enumerate(["red", "blue", "green"] * 6)}
    build_vqa(photos, tmp_path / "again", replace(CONFIG, attributes=attributes))
    for name in ("train.json", "eval.json", "manifest.json", "embeddings.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    assert load_manifest(tmp_path / "again")["vocabulary"] == load_manifest(out)["vocabulary"]
    before = (out / "train.json").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        build_vqa(photos, out, CONFIG)
    assert (out / "train.json").read_bytes() == before


def test_too_few_identities_is_a_clear_error(tmp_path):
    photos = embedding_cluster_photos(num_identities=4, photos_per_identity=3, dim=8)
    with pytest.raises(ValueError, match="need 6 unknown identities"):
        build_vqa(photos, tmp_path, CONFIG)
    with pytest.raises(ValueError, match="num_enrolled=9"):
        build_vqa(photos, tmp_path, replace(CONFIG, num_enrolled=9, num_train_unknown=0, num_eval_unknown=0))
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(ValueError, match="VQABuildConfig.tasks"):
        VQABuildConfig(tasks=("naming", "dance"))


def test_embedding_table_source(tmp_path):
    from safetensors.numpy import save_file

    emb = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
    labels = np.repeat(np.arange(4), 3)
    save_file(
        {"embeddings": emb, "labels": labels},
        str(tmp_path / "t.safetensors"),
        metadata={"identities": '["ann", "ben", "cat", "dan"]'},
    )
    photos = embedding_table_photos(tmp_path / "t.safetensors")
    assert [p.identity for p in photos[::3]] == ["ann", "ben", "cat", "dan"]
    np.testing.assert_array_equal(photos[4].embedding, emb[4])
    save_file({"embeddings": emb}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="'labels'"):
        embedding_table_photos(tmp_path / "bad.safetensors")


def test_synthetic_crops_and_composed_scenes(tmp_path):
    from PIL import Image

    out = tmp_path / "syn"
    photos = synthetic_photos(out, num_identities=5, photos_per_identity=3, seed=0)
    Image.new("RGB", (300, 200), (40, 90, 160)).save(tmp_path / "bg.jpg")
    config = VQABuildConfig(
        num_train_unknown=1, num_eval_unknown=1, train_per_task=4, eval_per_task=3, tasks=("naming", "caption")
    )
    manifest = build_vqa(photos, out, config, scenes=[tmp_path / "bg.jpg"])
    assert manifest["embeddings"] is None
    samples = load_samples(out / "train.json") + load_samples(out / "eval.json")
    check_files(samples, out)
    s = samples[0]
    assert s.images and s.faces[0].crop.startswith("crops/")
    with Image.open(out / s.images[0]) as scene:
        width = scene.width
        face = s.faces[-1]
        x1, y1, x2, y2 = face.box
        assert x2 <= width and all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face.landmarks)
        # the pasted crop is really there: its pixels differ from the flat blue background
        patch = np.asarray(scene.crop((int(x1), int(y1), int(x2), int(y2))), dtype=np.float32)
        assert np.abs(patch - np.array([40, 90, 160])).mean() > 20


def test_build_vqa_command_from_a_folder_with_embeddings(tmp_path):
    from lvface_mm.cli import main

    synthetic_photos(tmp_path / "faces", num_identities=6, photos_per_identity=3, seed=1)  # faces/crops/<id>/<k>.png
    out = tmp_path / "vqa"
    argv = [
        "build-vqa",
        "--source",
        "folder",
        "--path",
        str(tmp_path / "faces" / "crops"),
        "--embed",
        "lvface_tiny",
        "--random-weights",
        "--out",
        str(out),
        "--tasks",
        "naming,counting",
        "--train-per-task",
        "5",
        "--eval-per-task",
        "3",
        "--num-train-unknown",
        "1",
        "--num-eval-unknown",
        "1",
    ]
    assert main(argv) == 0
    manifest = load_manifest(out)
    assert manifest["embeddings"]["rows"] == 18 and manifest["embeddings"]["dim"] == 512
    samples = load_samples(out / "train.json")
    assert {s.task for s in samples} == {"naming", "counting"}
    check_files(samples, out, num_embeddings=18)
    assert main(argv) == 2  # an existing dataset is never overwritten without --overwrite
    assert main(["build-vqa", "--source", "clusters", "--num-identities", "3", "--out", str(tmp_path / "few")]) == 2
    assert not (tmp_path / "few").exists()


def test_recordio_source_writes_labelled_crops_that_build_a_dataset(tmp_path):
    from PIL import Image

    from lvface_mm.data.pack import pack_identity_folder
    from lvface_mm.vqa.sources import recordio_photos
    from tests._datasets_and_eval_fixtures import write_identity_tree

    src = write_identity_tree(tmp_path / "src", identities=6, per_identity=4)
    pack_identity_folder(src, tmp_path / "rec", progress=False, workers=1)
    out = tmp_path / "vqa"
    photos = recordio_photos(tmp_path / "rec", out)
    assert len(photos) == 24 and len({p.photo for p in photos}) == 24
    by_identity: dict[str, list] = {}
    for p in photos:
        by_identity.setdefault(p.identity, []).append(p)
    assert sorted(len(v) for v in by_identity.values()) == [4] * 6
    # Every crop is one of its own identity's source images (packed as JPEG q95), none of another's.
    folders = sorted(src.iterdir())
    for label, identity in enumerate(sorted(by_identity)):
        sources = [np.asarray(Image.open(f).convert("RGB"), np.float32) for f in sorted(folders[label].iterdir())]
        for p in by_identity[identity]:
            crop = np.asarray(Image.open(p.crop).convert("RGB"), np.float32)
            assert crop.shape == (112, 112, 3) and Path(p.crop).is_relative_to(out.resolve())
            assert min(np.abs(crop - s).mean() for s in sources) < 3.0
    assert len(recordio_photos(tmp_path / "rec", tmp_path / "subset", limit=5)) == 5

    config = VQABuildConfig(
        num_train_unknown=1, num_eval_unknown=1, train_per_task=6, eval_per_task=4, tasks=("naming", "recognition")
    )
    manifest = build_vqa(photos, out, config)
    train, evaluation = load_samples(out / "train.json"), load_samples(out / "eval.json")
    check_splits(train, evaluation, manifest["eval_unknown"])
    check_files(train + evaluation, out)
    assert len(manifest["enrolled"]) == 4 and train and evaluation
