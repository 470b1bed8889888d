"""Open-set binding data: references in the context, names per sample, splits by identity and name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lvface_mm.vqa.binding import BindingConfig, build_binding_vqa
from lvface_mm.vqa.data import FaceStore
from lvface_mm.vqa.rendering import RenderedDataset, SampleRenderer
from lvface_mm.vqa.schema import load_samples
from lvface_mm.vqa.sources import embedding_cluster_photos
from tests._vlm_fixtures import tiny_identity_vlm

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = BindingConfig(num_eval_identities=6, name_pool_size=200, train_per_task=60, eval_per_task=20)


@pytest.fixture(scope="module")
def binding(tmp_path_factory):
    out = tmp_path_factory.mktemp("binding")
    manifest = build_binding_vqa(embedding_cluster_photos(20, 4, dim=64, seed=5), out, CONFIG)
    return out, manifest, load_samples(out / "train.json"), load_samples(out / "eval.json")


def _names_in(samples) -> set[str]:
    return {r["name"] for s in samples for r in s.meta["references"]}


def _identities_in(samples) -> set[str]:
    faces = {f.identity for s in samples for f in s.faces}
    return faces | {r["identity"] for s in samples for r in s.meta["references"]}


def test_evaluation_people_and_names_never_occur_in_training(binding) -> None:
    _, manifest, train, evaluation = binding
    assert _identities_in(train) & _identities_in(evaluation) == set()
    assert _names_in(train) & _names_in(evaluation) == set()
    train_text = " ".join(t.text for s in train for t in s.turns)
    assert not any(re.search(rf"\b{n}\b", train_text) for n in _names_in(evaluation))
    assert set(manifest["eval_identities"]) == {f.identity for s in evaluation for f in s.faces}


def test_seen_split_has_training_people_under_evaluation_names(binding) -> None:
    out, manifest, train, evaluation = binding
    seen = load_samples(out / "eval_seen.json")
    assert manifest["num_samples"]["eval_seen"] == len(seen) == len(evaluation)
    assert _identities_in(seen) <= set(manifest["train_identities"])
    assert _names_in(seen).isdisjoint(_names_in(train))
    eval_names = _names_in(evaluation)
    assert len(_names_in(seen) & eval_names) > 0.5 * len(_names_in(seen))  # drawn from the evaluation pool
    assert {f.photo for s in seen for f in s.faces} <= {f.photo for s in train for f in s.faces}


def test_names_are_drawn_per_sample_and_candidates_include_wrong_ones(binding) -> None:
    _, _, train, _ = binding
    names_of: dict[str, set[str]] = {}
    omitted = distractors = 0
    for s in train:
        refs = {r["identity"]: r["name"] for r in s.meta["references"]}
        for ident, name in refs.items():
            names_of.setdefault(ident, set()).add(name)
        assert len(refs) == CONFIG.num_candidates and len(set(refs.values())) == len(refs)
        asked = s.faces[s.meta["face"]]
        present = {f.identity for f in s.faces}
        omitted += asked.identity not in refs
        distractors += bool(set(refs) - present)
        # the answer is the asked face's reference name, or the unknown person when it was left out
        assert s.answer == (f"{refs[asked.identity]}." if asked.identity in refs else "This is an unknown person.")
        # a reference photo is never the photo in the picture
        assert not {r["photo"] for r in s.meta["references"]} & {f.photo for f in s.faces}
    assert max(len(v) for v in names_of.values()) > 5  # one identity, many names
    assert omitted > 0 and distractors > len(train) // 2


def test_pool_too_small_or_existing_output_fail_before_writing(tmp_path: Path) -> None:
    photos = embedding_cluster_photos(20, 4, dim=64, seed=5)
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(
        ValueError, match=r"name_pool_size=20 leaves 15 training names; need at least 12|leaves 5 evaluation"
    ):
        build_binding_vqa(photos, tmp_path, BindingConfig(num_eval_identities=6, name_pool_size=20))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="open-set binding needs at least"):
        build_binding_vqa(photos[:20], tmp_path, CONFIG)


@pytest.mark.parametrize("build", ["causal_lm", "llava"])
def test_token_mode_shows_references_with_their_tokens(binding, build: str) -> None:
    out, _, train, _ = binding
    vlm = tiny_identity_vlm(build)
    renderer = SampleRenderer(vlm, out, "token")
    s = next(x for x in train if len(x.faces) == 2)
    text, _, _ = renderer.prompt(s)
    refs = s.meta["references"]
    for j, r in enumerate(refs):
        assert f"- reference <face_{2 + j}>: {r['name']}" in text
    assert "- face 1 <face_0>, on the left, box" in text
    assert not any(f"box {x}" in text for x in ("Alice",))
    for f in s.faces:  # face lines carry no names in open-set token mode
        if f.name:
            assert text.count(f.name) == 1
    encoded = renderer.encode(s)
    assert encoded.face_order == (0, 1, 2, 3, 4)
    store = FaceStore.open(out, "embedding")
    data = RenderedDataset(train[:8], renderer, store, pad_id=vlm.processor.tokenizer.pad_token_id)
    item = data[train[:8].index(s)] if s in train[:8] else data[0]
    n = renderer.face_count(train[:8][0] if s not in train[:8] else s)
    assert int(item["face_mask"].sum()) == n
    table = store.embeddings
    sample = s if s in train[:8] else train[0]
    expected = torch.cat(
        [table[[f.embedding for f in sample.faces]], table[[r["embedding"] for r in sample.meta["references"]]]]
    )
    assert torch.equal(item["faces"][:n], expected)


@pytest.mark.parametrize("build", ["llava", "qwen2_vl", "causal_lm"])
def test_open_set_training_prompt_is_the_api_prompt(build: str, tmp_path: Path) -> None:
    from dataclasses import replace

    from lvface_mm.vlm.grounding import Reference
    from lvface_mm.vqa.data import IGNORE_INDEX
    from tests._vlm_fixtures import Face as PictureFace
    from tests.test_vqa_rendering import BOXES, H, W, write_dataset

    vlm = tiny_identity_vlm(build)
    sample, scene, crops = write_dataset(tmp_path)
    refs = [{"name": "Koren", "crop": "crops/0_1.png"}, {"name": "Sheli", "crop": "crops/0_0.png"}]
    sample = replace(sample, meta={"references": refs})
    if vlm.family.text_only:
        sample = replace(
            sample, images=(), image_size=(W, H), faces=tuple(replace(f, image=None) for f in sample.faces)
        )
    encoded = SampleRenderer(vlm, tmp_path, "token").encode(sample)
    n_prompt = int((encoded.labels != IGNORE_INDEX).nonzero()[0])
    picture = vlm.find_faces(scene, [PictureFace(b, c) for b, c in zip(BOXES, crops)])
    references = [Reference("Koren", 2), Reference("Sheli", 3)]
    prompt, images = vlm.grounded_prompt(
        picture, vlm.ground(picture), "Who is on the left?", True, references=references
    )
    inputs, _ = vlm.prepare([prompt], images, [picture.crops], extra_tokens=torch.zeros(2, 2, 32))
    assert encoded.input_ids[:n_prompt].tolist() == inputs.inputs["input_ids"][0].tolist()
    assert encoded.face_order == inputs.face_order[0] == (0, 1, 2, 3)
    assert "- reference <face_2>: Koren\n- reference <face_3>: Sheli" in prompt and ": Alice." not in prompt


def test_ask_in_open_set_mode_shows_the_gallerys_candidates() -> None:
    import numpy as np

    from lvface_mm.vlm.projectors import FaceFeatures

    vlm = tiny_identity_vlm("llava")
    gallery, faces, image = two_people_scene(noise=0.3)
    answer = vlm.ask(
        image, "Who is on the left?", gallery, faces=faces, identity_tokens=True, references=2, max_new_tokens=2
    )
    lines = [line for line in answer.prompt.split("\n") if line.startswith("- ")]
    assert lines[0].startswith("- face 1 <face_0>, on the left") and lines[0].endswith("].")  # no name on faces
    ref_lines = lines[2:]
    assert {line.split(" ")[3] for line in ref_lines} >= {"Koren", "Sheli"}
    assert [line.split(" ")[2] for line in ref_lines] == [f"<face_{2 + j}>:" for j in range(len(ref_lines))]
    picture = vlm.find_faces(image, faces)
    refs, tokens, _ = vlm._references(picture, gallery, 2)
    expected = vlm.adapter.projector(
        FaceFeatures(pooled=torch.as_tensor(np.stack([gallery.template(r.name) for r in refs])))
    )
    torch.testing.assert_close(tokens, expected)
    with pytest.raises(ValueError, match="references need a gallery"):
        vlm.ask(image, "Who?", None, faces=faces, identity_tokens=True, references=2)


def two_people_scene(noise: float):
    """A gallery of Koren, Sheli and Tamo; a 64x32 picture with Sheli on the left and Koren on the
    right, their embeddings the enrolled ones plus `noise` x N(0, 1) per dimension."""
    import numpy as np

    from lvface_mm.gallery import Gallery
    from tests._vlm_fixtures import faces_at

    rng = np.random.default_rng(0)
    people = rng.standard_normal((3, 512)).astype(np.float32)
    people /= np.linalg.norm(people, axis=1, keepdims=True)
    gallery = Gallery(":memory:", threshold=0.9)
    for name, e in zip(("Koren", "Sheli", "Tamo"), people):
        gallery.enrol(name, e[None])
    faces = faces_at([(2.0, 2.0, 30.0, 30.0), (34.0, 2.0, 62.0, 30.0)])
    query = people[[1, 0]] + noise * rng.standard_normal((2, 512)).astype(np.float32)
    faces = [replace_embedding(f, q / np.linalg.norm(q)) for f, q in zip(faces, query)]
    return gallery, faces, rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)


def replace_embedding(face, embedding):
    from dataclasses import replace

    return replace(face, embedding=embedding)
