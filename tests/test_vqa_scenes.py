"""Procedural scenes: identity + picture questions, seen/unseen splits, and a tiny LLaVA trained on them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvface_mm.vqa.scenes import COLOURS, ScenesConfig, build_scenes_vqa
from lvface_mm.vqa.schema import load_samples

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ScenesConfig(num_identities=14, num_unseen=5, train_per_task=10, eval_per_task=4, name_pool_size=200)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    manifest = build_scenes_vqa(out, CONFIG)
    splits = {k: load_samples(out / f"{k}.json") for k in ("train", "eval_seen", "eval")}
    return out, manifest, splits


def test_splits_by_identity_and_name(scenes) -> None:
    _, manifest, splits = scenes
    ids = {k: {f.identity for s in v for f in s.faces} for k, v in splits.items()}
    names = {k: {r["name"] for s in v for r in s.meta["references"]} for k, v in splits.items()}
    assert ids["eval"] <= set(manifest["unseen_identities"]) and not ids["eval"] & ids["train"]
    assert ids["eval_seen"] <= ids["train"] | set(manifest["seen_identities"])
    assert not names["train"] & (names["eval"] | names["eval_seen"])
    seen_photos = {f.photo for s in splits["train"] for f in s.faces}
    assert not seen_photos & {f.photo for s in splits["eval_seen"] for f in s.faces}  # other photos of seen people


def test_region_answers_follow_the_picture(scenes) -> None:
    out, _, splits = scenes
    regions = [s for s in splits["train"] if s.task == "region"]
    assert regions
    for s in regions:
        holding = s.meta["holding"]  # "colour object" per face, left to right
        q = s.turns[0].text
        if m := re.fullmatch(r"What is (\w+) holding\?", q):
            j = next(i for i, f in enumerate(s.faces) if f.name == m.group(1))
            assert s.answer == f"A {holding[j]}."
        elif m := re.fullmatch(r"Who holds the (\w+ \w+)\?", q):
            j = holding.index(m.group(1))
            assert s.answer == f"{s.faces[j].name}."
        else:
            a, b = re.fullmatch(r"Is (\w+) left of (\w+)\?", q).groups()
            order = [f.name for f in s.faces]
            assert s.answer == ("Yes." if order.index(a) < order.index(b) else "No.")
        image = np.asarray(Image.open(out / s.images[0]).convert("RGB"))
        assert image.shape[:2] == (s.image_size[1], s.image_size[0])
        for f, held in zip(s.faces, holding):
            x1, y1, x2, y2 = (int(v) for v in f.box)
            crop = np.asarray(Image.open(out / f.crop).convert("RGB").resize((x2 - x1, y2 - y1)))
            assert np.abs(image[y1:y2, x1:x2].astype(int) - crop).mean() < 1.0  # the face is at its box
            colour = np.array(COLOURS[held.split()[0]])
            beside = image[y2 : y2 + 60, x2 : x2 + 40].reshape(-1, 3)
            assert (np.abs(beside - colour).sum(-1) < 10).sum() > 30  # its object, in its colour, beside it


def test_existing_output_is_never_replaced(scenes) -> None:
    out, _, _ = scenes
    before = (out / "train.json").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a VQA dataset"):
        build_scenes_vqa(out, CONFIG)
    assert (out / "train.json").read_bytes() == before
    with pytest.raises(ValueError, match="name_pool_size=20 leaves"):
        ScenesConfig(name_pool_size=20)


def test_tiny_llava_trains_on_scenes_with_pictures(scenes, tmp_path) -> None:
    from training.adapter import main

    out, _, _ = scenes
    argv = [
        "--config",
        str(ROOT / "training" / "configs" / "adapter" / "tiny_scenes.yaml"),
        f"--data.path={out}",
        f"--output_dir={tmp_path / 'run'}",
        "--stage1.max_steps=2",
        "--stage2.max_steps=3",
        "--stage1.batch_size=4",
        "--stage2.batch_size=4",
        "--eval.modes=[token, som]",
        "--eval.max_per_task=1",
        "--eval.max_new_tokens=4",
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"]["2"]["finished"]
    assert set(summary["eval"]["results"]) == set(summary["eval"]["seen_results"]) == {"token", "som"}
    assert "decision_vs_gallery" in summary["eval"]["results"]["token"]
    assert (tmp_path / "run" / "eval_seen" / "answers.json").is_file()
    base = json.loads((tmp_path / "run" / "base" / "config.json").read_text())
    assert base["model_type"] == "llava"  # pictures went through a VLM, not a text-only LLM


def test_bad_samples_are_listed_before_any_training_step(scenes, tmp_path) -> None:
    import shutil

    from lvface_mm.vqa.schema import VQAValidationError
    from training.adapter import main

    src, _, splits = scenes
    data = tmp_path / "data"
    shutil.copytree(src, data)
    raws = json.loads((data / "train.json").read_text())
    broken, moved = raws[0], raws[1]
    (data / broken["images"][0]).write_bytes(b"not an image")
    del moved["image_size"]  # the box is then checked against the scene image itself
    moved["faces"][0]["box"] = [150.0, 4.0, 260.0, 40.0]  # past the 200 px wide scene
    (data / "train.json").write_text(json.dumps(raws))
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    argv = ["--config", str(ROOT / "training/configs/adapter/tiny_scenes.yaml"), f"--data.path={data}"]
    with pytest.raises(VQAValidationError) as info:
        main([*argv, f"--output_dir={run}", "--eval.enabled=false"])
    listed = {(sid, field) for sid, field, _ in info.value.errors}
    assert listed == {(broken["id"], "images[0]"), (moved["id"], "faces[0].box")}
    assert not (run / "stage1" / "checkpoints").exists()  # no step ran
    assert (run / "notes.txt").read_text() == "keep me"


def test_tiny_llava_wraps_the_causal_lm_in_model_path(scenes, tmp_path) -> None:
    """smollm2_scenes.yaml with a small LLM: card tiny-llava + model_path wraps that LLM (weights
    unchanged) in a LLaVA, and LoRA lands in the vision tower only."""
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    from lvface_mm.vqa.testing import TinyLLMConfig, tiny_llm_for_samples
    from training.adapter import main

    out, _, splits = scenes
    lm, tokenizer = tiny_llm_for_samples(splits["train"], TinyLLMConfig(hidden_size=48, num_hidden_layers=1, seed=3))
    lm_dir = tmp_path / "lm"
    lm.save_pretrained(str(lm_dir))
    tokenizer.save_pretrained(str(lm_dir))
    run = tmp_path / "run"
    argv = [
        "--config",
        str(ROOT / "training" / "configs" / "adapter" / "smollm2_scenes.yaml"),
        f"--data.path={out}",
        f"--output_dir={run}",
        f"--model.model_path={lm_dir}",
        "--model.gguf_file=null",
        "--stage2.max_steps=1",
        "--stage2.batch_size=2",
        "--eval.enabled=false",
    ]
    assert main(argv) == 0
    base = json.loads((run / "base" / "config.json").read_text())
    assert base["model_type"] == "llava" and base["text_config"]["hidden_size"] == 48
    llava = LlavaForConditionalGeneration.from_pretrained(str(run / "base"))
    wrapped = llava.model.language_model.state_dict()
    for name, value in lm.model.state_dict().items():
        rows = value.shape[0]  # the embedding table may have grown by <image>
        assert torch.equal(wrapped[name][:rows], value), name
    # the recipe's LoRA sits in the vision tower only: the LLM's text-only answers stay the base's
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        lora = [k for k in f.keys() if "lora_" in k]  # noqa: SIM118 (safe_open is not iterable)
    assert lora and all(".vision_tower." in k for k in lora), lora[:3]
    card = json.loads((run / "adapter" / "identity_adapter_config.json").read_text())
    assert Path(card["vlm_id"]) == (run / "base").resolve()  # reloads the wrapped model, not the bare LLM
