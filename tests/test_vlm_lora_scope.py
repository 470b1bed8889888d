"""lora_scope "faces": the LoRA acts on prompts with identity tokens and nowhere else, row by row."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lvface_mm.vlm.config import IdentityAdapterConfig
from lvface_mm.vlm.testing import random_face_crops, tiny_card
from tests._vlm_fixtures import tiny_identity_vlm

pytestmark = pytest.mark.usefixtures("single_thread")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}


def scoped_vlm(scope: str, build: str = "causal_lm", lora: dict | None = None):
    """A tiny model with a LoRA far from zero (PEFT starts B at zero, which would hide everything)."""
    vlm = tiny_identity_vlm(build, lora_scope=scope)
    vlm.apply_lora(lora or LORA)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in vlm.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    vlm.model.eval()
    return vlm


def mixed_batch(vlm, images=None):
    """Two prompts: row 0 refers to a face, row 1 has none."""
    texts = [
        vlm.processor.render_chat([{"role": "user", "content": vlm.family.user_content(t, 0 if images is None else 1)}])
        for t in ("Who is <face_0> ?", "What is the capital of France ?")
    ]
    return vlm.prepare(texts, images, [random_face_crops(1, seed=3), None])


def logits(vlm, inputs, tokens):
    with torch.no_grad():
        return vlm.forward(inputs, tokens).logits


def test_a_row_without_faces_runs_the_base_model_and_a_row_with_faces_the_lora() -> None:
    vlm = scoped_vlm("faces")
    inputs, tokens = mixed_batch(vlm)
    scoped = logits(vlm, inputs, tokens)
    with vlm.model.disable_adapter():
        base = logits(vlm, inputs, tokens)
    vlm.lora_scope.scope = "all"
    everywhere = logits(vlm, inputs, tokens)
    assert not torch.allclose(everywhere[1], base[1], atol=1e-3)  # this LoRA does change a text-only row
    torch.testing.assert_close(scoped[1], base[1], rtol=0, atol=1e-6)  # ... but not under the faces scope
    torch.testing.assert_close(scoped[0], everywhere[0], rtol=0, atol=1e-6)  # the face row keeps its LoRA
    assert not torch.allclose(scoped[0], base[0], atol=1e-3)


def test_text_only_generation_equals_the_base_and_scope_all_does_not() -> None:
    from lvface_mm.vqa.retention import GENERAL_QUESTIONS, text_retention

    for scope, same in (("faces", True), ("all", False)):
        vlm = scoped_vlm(scope)
        result = text_retention(vlm, GENERAL_QUESTIONS[:6], batch_size=3, max_new_tokens=6)
        equal = [a["trained"] == a["base"] for a in result["answers"]]
        assert all(equal) if same else not all(equal), scope


def test_beams_repeat_each_rows_choice() -> None:
    vlm = scoped_vlm("faces")
    inputs, tokens = mixed_batch(vlm)
    beams = vlm.generate_ids(inputs, tokens, max_new_tokens=4, num_beams=2, num_return_sequences=2)
    with vlm.model.disable_adapter():
        base = vlm.generate_ids(inputs, tokens, max_new_tokens=4, num_beams=2, num_return_sequences=2)
    assert beams.shape[0] == 4 and torch.equal(beams[2:], base[2:])  # rows 2, 3: the text-only prompt's beams


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_gradients_reach_the_lora_only_from_rows_with_faces(checkpointing: bool) -> None:
    vlm = scoped_vlm("faces")
    inputs, tokens = mixed_batch(vlm)
    if checkpointing:
        vlm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vlm.model.train()
    lora = {n: p for n, p in vlm.model.named_parameters() if "lora_" in n}
    grads = {}
    for row in (0, 1):
        vlm.model.zero_grad(set_to_none=True)
        out = vlm.forward(inputs, [t.detach() for t in tokens])
        out.logits[row].float().pow(2).mean().backward()  # backward after the forward's block has closed
        grads[row] = {n: (p.grad.abs().sum().item() if p.grad is not None else 0.0) for n, p in lora.items()}
    assert sum(grads[0].values()) > 0  # the face row trains the LoRA
    assert sum(grads[1].values()) == 0  # the text-only row ran the base weights: nothing to learn


VISION_AND_TEXT = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": r".*(vision_tower|language_model).*\.(q_proj|v_proj)",
    "modules_to_save": ["multi_modal_projector"],  # a trained copy PEFT cannot split by row
}


def test_a_picture_without_faces_gets_the_base_vision_tower_and_projector_too() -> None:
    vlm = scoped_vlm("faces", "llava", VISION_AND_TEXT)
    assert any("vision_tower" in n and "lora_B" in n for n, _ in vlm.model.named_parameters())
    with torch.no_grad():  # the projector's trained copy differs from the original
        for name, param in vlm.model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.1)
    picture = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    text = vlm.processor.render_chat([{"role": "user", "content": vlm.family.user_content("Describe it.", 1)}])
    inputs, tokens = vlm.prepare([text], [[picture]], None)
    scoped = logits(vlm, inputs, tokens)
    with vlm.model.disable_adapter():
        base = logits(vlm, inputs, tokens)
    vlm.lora_scope.scope = "all"
    everywhere = logits(vlm, inputs, tokens)
    torch.testing.assert_close(scoped, base, rtol=0, atol=1e-6)
    assert not torch.allclose(everywhere, base, atol=1e-3)
    # Later calls are not left switched off: a face prompt gets the LoRA and the trained projector.
    vlm.lora_scope.scope = "faces"
    face_text = vlm.processor.render_chat(
        [{"role": "user", "content": vlm.family.user_content("Who is <face_0> ?", 1)}]
    )
    inputs, tokens = vlm.prepare([face_text], [[picture]], [random_face_crops(1, seed=3)])
    scoped = logits(vlm, inputs, tokens)
    vlm.lora_scope.scope = "all"
    torch.testing.assert_close(scoped, logits(vlm, inputs, tokens), rtol=0, atol=1e-6)


def test_a_mixed_picture_batch_keeps_the_face_rows_lora() -> None:
    vlm = scoped_vlm("faces", "llava", VISION_AND_TEXT)
    pictures = [[np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)] for i in range(2)]
    inputs, tokens = mixed_batch(vlm, pictures)
    scoped = logits(vlm, inputs, tokens)
    vlm.lora_scope.scope = "all"
    torch.testing.assert_close(scoped[0], logits(vlm, inputs, tokens)[0], rtol=0, atol=1e-6)


def test_merged_lora_is_refused_by_name() -> None:
    vlm = scoped_vlm("faces")
    vlm.model.merge_adapter()
    inputs, tokens = mixed_batch(vlm)
    with pytest.raises(ValueError, match="merged into the weights cannot be switched off per prompt"):
        logits(vlm, inputs, tokens)


def test_config_scope_values_versions_and_dora() -> None:
    card = tiny_card("causal_lm")
    assert card.lora_scope == "faces"
    with pytest.raises(ValueError, match="lora_scope must be one of"):
        card.replace(lora_scope="text")
    with pytest.raises(ValueError, match="cannot do for DoRA"):
        card.replace(lora={"r": 4, "use_dora": True})
    assert card.replace(lora={"r": 4, "use_dora": True}, lora_scope="all").lora.use_dora
    # Adapters written before the field existed keep the behaviour they were trained with.
    old = {**json.loads(card.to_json_string()), "schema_version": 2}
    del old["lora_scope"]
    assert IdentityAdapterConfig.from_dict(old).lora_scope == "all"
    assert IdentityAdapterConfig.from_dict(json.loads(card.to_json_string())).lora_scope == "faces"


def test_the_scope_survives_save_and_load(tmp_path) -> None:
    from lvface_mm.vlm.testing import tiny_identity_vlm as tiny_vlm_with_adapter

    vlm = scoped_vlm("faces")
    inputs, tokens = mixed_batch(vlm)
    before = logits(vlm, inputs, tokens)
    vlm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "identity_adapter_config.json").read_text())["lora_scope"] == "faces"
    loaded = tiny_vlm_with_adapter("causal_lm", adapter=tmp_path)
    inputs2, tokens2 = mixed_batch(loaded)
    torch.testing.assert_close(logits(loaded, inputs2, tokens2), before, rtol=1e-5, atol=1e-5)


def test_a_run_config_sets_the_scope_and_names_a_bad_one() -> None:
    from training.adapter import AdapterModelConfig, AdapterRunConfig, _card

    with pytest.raises(ValueError, match="model.lora_scope must be 'faces' or 'all', got 'text'"):
        AdapterModelConfig(lora_scope="text")
    assert _card(AdapterRunConfig(model=AdapterModelConfig(card="tiny-llava")), "m").lora_scope == "faces"
    run = AdapterRunConfig(model=AdapterModelConfig(card="tiny-llava", lora_scope="all"))
    assert _card(run, "m").lora_scope == "all"
