"""Prompt grounding with a real gallery, and IdentityVLM.ask / caption / stream on tiny models."""

from __future__ import annotations

import numpy as np
import pytest

from lvface_mm.gallery import Gallery
from lvface_mm.vlm import GroundedFace, find_mentions, ground_faces, grounding_text, render_grounded_prompt
from lvface_mm.vlm.grounding import horizontal_position
from lvface_mm.vlm.model import CAPTION_REQUEST
from lvface_mm.vlm.testing import random_face_crops
from tests._vlm_fixtures import Face, tiny_identity_vlm  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

WIDTH, HEIGHT = 300, 120
ALICE = np.eye(512, dtype=np.float32)[0]
BOB = np.eye(512, dtype=np.float32)[1]


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.fixture
def gallery() -> Gallery:
    g = Gallery(":memory:", threshold=0.6)
    g.enrol("Alice", ALICE[None])
    g.enrol("Bob", BOB[None])
    return g


@pytest.fixture
def picture_faces() -> list[Face]:
    """Bob on the right (detected first), an unknown in the centre, Alice on the left."""
    crops = random_face_crops(3, seed=11)
    stranger = unit(np.random.default_rng(0).standard_normal(512).astype(np.float32) * 0.01 + np.eye(512)[7])
    return [
        Face((230.0, 20.0, 280.0, 80.0), crops[0], unit(BOB + 0.1 * ALICE)),
        Face((130.0, 30.0, 170.0, 75.0), crops[1], stranger),
        Face((10.4, 25.6, 60.0, 90.2), crops[2], unit(ALICE + 0.2 * BOB)),
    ]


EXPECTED_TEXT = (
    "A face recognizer found 3 faces in the picture, listed from left to right:\n"
    "- face 3, on the left, box [10, 26, 60, 90]: Alice.\n"
    "- face 2, in the centre, box [130, 30, 170, 75]: an unknown person.\n"
    "- face 1, on the right, box [230, 20, 280, 80]: Bob.\n"
    "Use only these names for these people. Never invent a name: call anyone without a name an unknown person."
)


def grounded(faces: list[Face], gallery: Gallery) -> list[GroundedFace]:
    return ground_faces([f.box for f in faces], WIDTH, np.stack([f.embedding for f in faces]), gallery)


def test_positions_by_thirds() -> None:
    assert horizontal_position((0, 0, 20, 10), 90) == "left"
    assert horizontal_position((30, 0, 60, 10), 90) == "centre"
    assert horizontal_position((70, 0, 90, 10), 90) == "right"
    with pytest.raises(ValueError, match="image_width must be > 0"):
        horizontal_position((0, 0, 1, 1), 0)


def test_known_gallery_gives_expected_prompt_and_marks_unknowns(picture_faces, gallery) -> None:
    faces = grounded(picture_faces, gallery)
    assert [(f.index, f.name, f.position) for f in faces] == [
        (0, "Bob", "right"),
        (1, None, "centre"),
        (2, "Alice", "left"),
    ]
    assert faces[1].label == "an unknown person" and faces[1].identity_id is None
    assert faces[0].score == pytest.approx(float(unit(BOB + 0.1 * ALICE) @ BOB), abs=1e-5)
    assert grounding_text(faces) == EXPECTED_TEXT
    with_refs = grounding_text(faces, face_refs=True)
    assert "- face 3 <face_2>, on the left" in with_refs and "- face 1 <face_0>, on the right" in with_refs
    assert grounding_text([]) == "A face recognizer found no faces in the picture."
    # Without a gallery every face is unknown.
    assert all(f.name is None for f in ground_faces([f.box for f in picture_faces], WIDTH))


def test_rendered_through_any_chat_template(picture_faces, gallery) -> None:
    faces = grounded(picture_faces, gallery)
    vlm = tiny_identity_vlm("llava")
    prompt = render_grounded_prompt(vlm.processor.processor, "Who is on the left?", faces)
    assert prompt == f"<|im_start|>user <image> {EXPECTED_TEXT}\nWho is on the left? <|im_end|><|im_start|>assistant"
    lm = tiny_identity_vlm("causal_lm")
    prompt = render_grounded_prompt(lm.processor.tokenizer, "Who is on the left?", faces, num_images=0)
    assert prompt == f"<|im_start|>user {EXPECTED_TEXT}\nWho is on the left? <|im_end|><|im_start|>assistant"


def test_mentions_point_at_faces(picture_faces, gallery) -> None:
    faces = grounded(picture_faces, gallery)
    mentions = find_mentions("Alice waves at face 2 while Bob and Alicea watch.", faces)
    assert [(m.text, m.face_indices, m.name) for m in mentions] == [
        ("Alice", (2,), "Alice"),
        ("face 2", (1,), None),
        ("Bob", (0,), "Bob"),
    ]
    assert mentions[0].boxes == (faces[2].box,)


@pytest.mark.parametrize("build", ["llava", "causal_lm"])
def test_ask_caption_and_stream(build: str, picture_faces, gallery) -> None:
    vlm = tiny_identity_vlm(build)
    image = np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    answer = vlm.ask(image, "Who is on the left?", gallery, faces=picture_faces, max_new_tokens=4)
    assert [f.name for f in answer.faces] == ["Bob", None, "Alice"]
    # Prompt grounding only (untrained adapter); boxes in the family's notation (normalised 0-1 here).
    assert "- face 3, on the left, box [0.035, 0.213, 0.200, 0.752]: Alice." in answer.prompt
    assert "<face" not in answer.prompt
    assert ("<image>" in answer.prompt) == (build == "llava")
    assert isinstance(answer.text, str) and answer.text
    assert answer.mentions == find_mentions(answer.text, answer.faces)

    caption = vlm.caption(image, gallery, faces=picture_faces, identity_tokens=True, max_new_tokens=4)
    assert CAPTION_REQUEST in caption.prompt and "<face_2>" in caption.prompt

    stream = vlm.stream(image, "Who is on the left?", gallery, faces=picture_faces, max_new_tokens=4)
    pieces = list(stream)
    streamed = stream.answer(timeout=60)
    assert "".join(pieces).strip() == streamed.text == answer.text  # greedy: same answer as ask()


def test_ask_errors_are_clear(picture_faces) -> None:
    vlm = tiny_identity_vlm("llava")
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="no faces were passed and this IdentityVLM has no detector"):
        vlm.ask(image, "Who?")
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        vlm.ask(image, " ", faces=picture_faces)
    with pytest.raises(ValueError, match=r"image arrays must be \(H, W, 3\) uint8 RGB"):
        vlm.ask(image[..., 0], "Who?", faces=picture_faces)
    bad = [Face((0, 0, 10, 10), np.zeros((64, 64, 3), dtype=np.uint8))]
    with pytest.raises(ValueError, match=r"face 0: crop must be \(112, 112, 3\) uint8"):
        vlm.ask(image, "Who?", faces=bad)
