"""Boxes in each family's native notation, Set-of-Mark drawing, and suppression of input-only tokens."""

from __future__ import annotations

import numpy as np
import pytest

from lvface_mm.vlm import GroundedFace, get_family
from lvface_mm.vlm.boxes import format_box, loc_bin, normalise_box
from lvface_mm.vlm.grounding import Reference, family_prompt, grounding_text
from lvface_mm.vlm.set_of_mark import MarkStyle, draw_marks
from tests._vlm_fixtures import faces_at, tiny_identity_vlm

pytestmark = pytest.mark.usefixtures("single_thread")

BOX = (40.0, 30.0, 120.0, 90.0)  # on a 200 x 120 picture
W, H = 200, 120


def test_normalised_box_for_llava_like_families() -> None:
    for family in ("llava", "llava_next", "idefics3", "causal_lm"):
        assert get_family(family).format_box(BOX, W, H) == "[0.200, 0.250, 0.600, 0.750]"


def test_qwen_box_on_the_1000_grid() -> None:
    text = get_family("qwen2_vl").format_box(BOX, W, H)
    assert text == "<|box_start|>(200,250),(600,750)<|box_end|>"


def test_paligemma_loc_tokens_y_before_x() -> None:
    text = get_family("paligemma").format_box(BOX, W, H)
    # y1 = 0.25 -> bin 256, x1 = 0.2 -> 204, y2 = 0.75 -> 768, x2 = 0.6 -> 614
    assert text == "<loc0256><loc0204><loc0768><loc0614>"
    assert loc_bin(1.0) == 1023 and loc_bin(0.0) == 0
    vlm = tiny_identity_vlm("paligemma")
    ids = vlm.processor.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 4  # each location is one token of PaliGemma's vocabulary
    assert vlm.processor.tokenizer.convert_ids_to_tokens(ids) == ["<loc0256>", "<loc0204>", "<loc0768>", "<loc0614>"]


def test_box_outside_the_picture_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"box \[40.0, 30.0, 250.0, 90.0\] is not inside the 200 x 120 picture"):
        normalise_box((40, 30, 250, 90), W, H)
    with pytest.raises(ValueError, match="unknown box format 'nope'"):
        format_box("nope", BOX, W, H)


@pytest.mark.parametrize(
    "build,expected",
    [
        ("qwen2_vl", "<|box_start|>(200,250),(600,750)<|box_end|>"),
        ("paligemma", "<loc0256><loc0204><loc0768><loc0614>"),
        ("llava", "[0.200, 0.250, 0.600, 0.750]"),
    ],
)
def test_family_prompt_writes_native_boxes(build: str, expected: str) -> None:
    vlm = tiny_identity_vlm(build)
    face = GroundedFace(index=0, box=BOX, position="centre", name="Alice")
    prompt = family_prompt(vlm.family, vlm.processor.processor, "Who is this?", [face], (W, H), face_refs=True)
    assert f"- face 1 <face_0>, in the centre, box {expected}: Alice." in prompt
    assert prompt.rstrip().endswith(("assistant", "Who is this?"))


def test_set_of_mark_text_and_references() -> None:
    faces = [GroundedFace(0, BOX, "centre", None), GroundedFace(1, (150.0, 10.0, 190.0, 60.0), "right", "Bob")]
    text = grounding_text(faces, marks=True)
    assert "drew a numbered box on each" in text
    assert "- mark 1, in the centre, box [40, 30, 120, 90]: an unknown person." in text
    assert "- mark 2, on the right, box [150, 10, 190, 60]: Bob." in text
    open_set = grounding_text(
        faces, face_refs=True, show_names=False, references=[Reference("Koren", 2), Reference("Sheli", 3)]
    )
    assert "- face 1 <face_0>, in the centre, box [40, 30, 120, 90]." in open_set
    assert "- reference <face_2>: Koren\n- reference <face_3>: Sheli" in open_set and "Bob" not in open_set
    with pytest.raises(ValueError, match="references need face_refs=True"):
        grounding_text(faces, references=[Reference("Koren", 2)])


def test_marks_land_on_the_boxes() -> None:
    image = np.full((H, W, 3), 128, dtype=np.uint8)
    boxes = [BOX, (150.0, 10.0, 190.0, 60.0)]
    style = MarkStyle(colour=(255, 0, 0), width=2)
    marked = draw_marks(image, boxes, style=style)
    assert marked.shape == image.shape and (image == 128).all()  # input untouched
    red = (marked == np.array([255, 0, 0], dtype=np.uint8)).all(axis=-1)  # (H, W)
    for x1, y1, x2, y2 in boxes:
        x1, y1, x2, y2 = int(x1), int(y1), int(x2) - 1, int(y2) - 1
        # Every outline pixel is red, on all four sides.
        assert red[y1 : y2 + 1, x1].all() and red[y1 : y2 + 1, x2].all()
        assert red[y1, x1 : x2 + 1].all() and red[y2, x1 : x2 + 1].all()
        # The interior is untouched except the number tag in the top-left corner.
        inner = marked[y1 + 10 : y2 - 2, x1 + 12 : x2 - 2]
        assert (inner == 128).all()
        tag = marked[y1 : y1 + 10, x1 : x1 + 8]
        assert (tag[..., 1] > 150).any()  # light digit pixels on the red tag
    outside = np.ones((H, W), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        outside[int(y1) : int(y2), int(x1) : int(x2)] = False
    assert (marked[outside] == 128).all()  # nothing drawn outside the boxes
    with pytest.raises(ValueError, match="2 numbers for 1 boxes"):
        draw_marks(image, [BOX], numbers=[1, 2])


def test_ask_with_set_of_mark_sends_the_marked_picture() -> None:
    vlm = tiny_identity_vlm("llava")
    image = np.full((64, 96, 3), 100, dtype=np.uint8)
    faces = faces_at([(4.0, 4.0, 40.0, 50.0), (50.0, 6.0, 90.0, 60.0)])
    picture = vlm.find_faces(image, faces)
    grounded = vlm.ground(picture)
    prompt, images = vlm.grounded_prompt(picture, grounded, "Who is there?", False, set_of_mark=True)
    assert "- mark 1, on the left, box [0.042, 0.062, 0.417, 0.781]: an unknown person." in prompt
    assert images is not None and not np.array_equal(images[0][0], image)
    answer = vlm.ask(image, "Who is there?", faces=faces, set_of_mark=True, max_new_tokens=3)
    assert answer.prompt == prompt


@pytest.mark.parametrize("build", ["qwen2_vl", "idefics3", "llava"])
def test_generation_never_emits_image_tokens(build: str) -> None:
    vlm = tiny_identity_vlm(build)
    reserved = vlm.family.input_only_token_ids(vlm.model.config, vlm.processor.tokenizer)
    assert vlm.model.config.image_token_id in reserved
    if build == "idefics3":
        assert vlm.processor.tokenizer.convert_tokens_to_ids("<global-img>") in reserved
    # Make every image marker the model's favourite token: the suppression must still hold.

    head = vlm.model.get_output_embeddings()
    import torch

    with torch.no_grad():
        for i in reserved:
            head.weight[i] = head.weight.abs().max() * 50 * torch.sign(head.weight.mean(0) + 1e-3)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    faces = faces_at([(2.0, 2.0, 14.0, 14.0)])

    picture = vlm.find_faces(image, faces)
    prompt, images = vlm.grounded_prompt(picture, vlm.ground(picture), "Who?", True)
    inputs, tokens = vlm.prepare([prompt], images, [picture.crops])
    answer_ids = vlm.generate_ids(inputs, tokens, max_new_tokens=4)
    assert not (set(answer_ids.flatten().tolist()) & (reserved | {vlm.processor.placeholder_id}))
