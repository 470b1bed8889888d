"""One prompt format for training and the API, with the picture, per family (tiny models from configs)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvface_mm.vlm.injection import IdentityTokens
from lvface_mm.vlm.testing import random_face_crops
from lvface_mm.vqa.data import IGNORE_INDEX, FaceStore
from lvface_mm.vqa.rendering import RenderedDataset, SampleRenderer, model_extras
from lvface_mm.vqa.schema import Face, Sample, Turn, VQAValidationError
from tests._vlm_fixtures import Face as PictureFace
from tests._vlm_fixtures import tiny_identity_vlm

pytestmark = pytest.mark.usefixtures("single_thread")

BUILDS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "fast_vlm", "causal_lm")
W, H = 96, 48
BOXES = [(4.0, 4.0, 44.0, 44.0), (52.0, 4.0, 92.0, 44.0)]
_VLMS: dict[str, object] = {}


def vlm_for(build: str):
    if build not in _VLMS:
        _VLMS[build] = tiny_identity_vlm(build)
    return _VLMS[build]


def write_dataset(root: Path, seed: int = 0) -> tuple[Sample, np.ndarray, np.ndarray]:
    """A scene with two faces pasted at BOXES, their crops on disk, and one naming sample."""
    crops = random_face_crops(2, seed=seed)
    rng = np.random.default_rng(100 + seed)
    scene = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    for crop, (x1, y1, x2, y2) in zip(crops, BOXES):
        scene[int(y1) : int(y2), int(x1) : int(x2)] = np.asarray(
            Image.fromarray(crop).resize((int(x2 - x1), int(y2 - y1)))
        )
    (root / "crops").mkdir(parents=True, exist_ok=True)
    (root / "scenes").mkdir(exist_ok=True)
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(root / "crops" / f"{seed}_{i}.png")
    Image.fromarray(scene).save(root / "scenes" / f"{seed}.png")
    faces = tuple(
        Face(identity=f"id{i}", name=name, crop=f"crops/{seed}_{i}.png", image=0, box=b)
        for i, (name, b) in enumerate(zip(["Alice", None], BOXES))
    )
    sample = Sample(
        id=f"s{seed}",
        task="naming",
        faces=faces,
        turns=(Turn("user", "Who is on the left?"), Turn("assistant", "Alice.")),
        images=(f"scenes/{seed}.png",),
        target={"names": ["Alice"]},
    )
    return sample, scene, crops


def for_family(vlm, sample: Sample) -> Sample:
    """Text-only LLMs see no picture: the faces keep their boxes on a virtual canvas of the scene's size."""
    if not vlm.family.text_only:
        return sample
    return replace(sample, images=(), image_size=(W, H), faces=tuple(replace(f, image=None) for f in sample.faces))


def answer_ids(vlm, encoded) -> list[int]:
    labelled = (encoded.labels != IGNORE_INDEX).nonzero().flatten()
    assert len(labelled) and bool((labelled == torch.arange(labelled[0], labelled[-1] + 1)).all())  # one block
    assert int(labelled[-1]) == len(encoded.labels) - 1  # the answer ends the example
    return encoded.input_ids[labelled].tolist()


@pytest.mark.parametrize("build", BUILDS)
def test_training_prompt_is_the_api_prompt(build: str, tmp_path: Path) -> None:
    vlm = vlm_for(build)
    sample, scene, crops = write_dataset(tmp_path)
    sample = for_family(vlm, sample)
    renderer = SampleRenderer(vlm, tmp_path, mode="token+prompt")
    encoded = renderer.encode(sample)
    n_prompt = int((encoded.labels != IGNORE_INDEX).nonzero()[0])
    # The API: the same faces and question through ask()'s own prompt builder.
    faces = [PictureFace(b, c) for b, c in zip(BOXES, crops)]
    picture = vlm.find_faces(scene, faces)
    grounded = [replace(f, name=n) for f, n in zip(vlm.ground(picture), ["Alice", None])]
    prompt, images = vlm.grounded_prompt(picture, grounded, "Who is on the left?", True, show_names=True)
    inputs, _ = vlm.prepare([prompt], images, [picture.crops])
    api_ids = inputs.inputs["input_ids"][0]
    assert encoded.input_ids[:n_prompt].tolist() == api_ids.tolist()
    assert "<face_0>" in prompt and "Alice" in prompt and "an unknown person" in prompt
    assert encoded.face_order == tuple(inputs.face_order[0]) == (0, 1)
    # Token mode (training's default) is what ask(identity_tokens=True) sends: no names on faces.
    token = SampleRenderer(vlm, tmp_path, mode="token").encode(sample)
    n_token = int((token.labels != IGNORE_INDEX).nonzero()[0])
    prompt, images = vlm.grounded_prompt(picture, grounded, "Who is on the left?", True)
    inputs, _ = vlm.prepare([prompt], images, [picture.crops])
    assert token.input_ids[:n_token].tolist() == inputs.inputs["input_ids"][0].tolist()
    assert "Alice" not in prompt


@pytest.mark.parametrize("build", BUILDS)
def test_labels_cover_the_answer_and_its_end(build: str, tmp_path: Path) -> None:
    vlm = vlm_for(build)
    sample = for_family(vlm, write_dataset(tmp_path)[0])
    encoded = SampleRenderer(vlm, tmp_path, mode="token").encode(sample)
    tok = vlm.processor.tokenizer
    ids = answer_ids(vlm, encoded)
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "").strip() == "Alice."
    end = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    assert ids[-1] in end  # the model is taught to stop
    config = vlm.model.config
    image_id = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
    if image_id is not None:
        image_rows = encoded.input_ids == image_id
        assert image_rows.sum() > 0 and bool((encoded.labels[image_rows] == IGNORE_INDEX).all())


def test_eos_is_labelled_for_templates_without_end_of_turn(tmp_path: Path) -> None:
    vlm = tiny_identity_vlm("llava")
    # llava-1.5's template: "USER: <image>\n... ASSISTANT: answer" with nothing closing the answer.
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for item in m['content'] %}"
        "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %} "
        "{% else %}ASSISTANT: {% for item in m['content'] %}{{ item['text'] }}{% endfor %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    vlm.processor.processor.chat_template = template
    sample, _, _ = write_dataset(tmp_path)
    encoded = SampleRenderer(vlm, tmp_path, mode="prompt").encode(sample)
    ids = answer_ids(vlm, encoded)
    assert ids[-1] == vlm.processor.tokenizer.eos_token_id
    assert vlm.processor.tokenizer.decode(ids[:-1]).replace(" ", "") == "Alice."


@pytest.mark.parametrize("build", [b for b in BUILDS if b != "causal_lm"])
def test_pixels_reach_the_model(build: str, tmp_path: Path) -> None:
    vlm = vlm_for(build)
    samples = [write_dataset(tmp_path, seed=s)[0] for s in (0, 1)]
    samples[1] = replace(samples[1], faces=samples[0].faces)  # same faces, another picture
    renderer = SampleRenderer(vlm, tmp_path, mode="token")
    store = FaceStore(tmp_path, "crop")
    data = RenderedDataset(samples, renderer, store, pad_id=vlm.processor.tokenizer.pad_token_id)
    batch = torch.utils.data.default_collate([data[0], data[1]])
    assert "pixel_values" in batch
    length = int(batch["attention_mask"].sum(1).max())
    extras = model_extras(batch, length)
    tokens = [vlm.encode_faces(random_face_crops(2, seed=0))] * 2
    identity = IdentityTokens.from_faces(tokens, [[0, 1], [0, 1]])
    with torch.no_grad(), vlm.injector.provide(identity):
        out = vlm.model(
            input_ids=batch["input_ids"][:, :length], attention_mask=batch["attention_mask"][:, :length], **extras
        )
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])  # same text, different pictures
    assert not torch.allclose(out.logits[0], out.logits[1], atol=1e-6)


def test_unreadable_image_and_bad_boxes_are_listed_before_training(tmp_path: Path) -> None:
    vlm = vlm_for("llava")
    good, _, _ = write_dataset(tmp_path)
    (tmp_path / "scenes" / "broken.png").write_bytes(b"not a png")
    broken = replace(good, id="broken", images=("scenes/broken.png",))
    outside = replace(good, id="outside", faces=(replace(good.faces[0], box=(80.0, 4.0, 120.0, 44.0)), good.faces[1]))
    renderer = SampleRenderer(vlm, tmp_path, mode="token")
    with pytest.raises(VQAValidationError) as info:
        renderer.check([good, broken, outside])
    errors = {(sid, field) for sid, field, _ in info.value.errors}
    assert errors == {("broken", "images[0]"), ("outside", "faces[0].box")}
    assert "falls outside the 96x48 image" in str(info.value)


def test_chatml_template_is_chatml_and_renders_incrementally() -> None:
    from jinja2 import Template

    from lvface_mm.vlm.testing import CHATML_TEMPLATE

    t = Template(CHATML_TEMPLATE)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who?"}]}
    prompt = t.render(messages=[user], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<image>\nWho?<|im_end|>\n<|im_start|>assistant\n"
    full = t.render(messages=[user, {"role": "assistant", "content": "Alice."}], add_generation_prompt=False)
    assert full == prompt + "Alice.<|im_end|>\n"


def test_tiny_smolvlm_processes_pictures_like_the_real_one() -> None:
    # `lvface-mm demo --tiny` captions with this build: the picture must reach the model.
    vlm = vlm_for("smolvlm")
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    picture = vlm.find_faces(image, [PictureFace((2.0, 2.0, 20.0, 20.0), random_face_crops(1)[0])])
    prompt, images = vlm.grounded_prompt(picture, vlm.ground(picture), "Describe the picture.", False)
    inputs, tokens = vlm.prepare([prompt], images, None)
    assert "pixel_values" in inputs.inputs
    assert int((inputs.inputs["input_ids"] == vlm.model.config.image_token_id).sum()) == 16
    other = np.full_like(image, 255)
    inputs2, _ = vlm.prepare([prompt], [[other]], None)
    with torch.no_grad():
        a = vlm.forward(inputs, tokens).logits
        b = vlm.forward(inputs2, tokens).logits
    assert not torch.allclose(a, b, atol=1e-6)
