"""IdentityVLM end to end on tiny models: adapter save/load, PEFT wrapping, training signal, ask/caption/stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lvface_mm.vlm.processing import ensure_embedding_row
from lvface_mm.vlm.testing import random_face_crops
from lvface_mm.vlm.testing import tiny_identity_vlm as tiny_vlm_with_adapter
from tests._vlm_fixtures import TINY_BUILDS, base_model, tiny_identity_vlm  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

FACE_PROMPT = "<face_1> stands next to <face_0> ."


def face_inputs(vlm, build: str):
    """A chat prompt with two face references (and the one image PaliGemma's processor insists on)."""
    images = [[np.zeros((8, 8, 3), dtype=np.uint8)]] if build == "paligemma" else None
    content = vlm.family.user_content(FACE_PROMPT, 1 if images else 0)
    text = vlm.processor.render_chat([{"role": "user", "content": content}])
    return vlm.prepare([text], images, [random_face_crops(2, seed=7)])


def logits(vlm, inputs, tokens) -> torch.Tensor:
    with torch.no_grad():
        return vlm.forward(inputs, tokens).logits


@pytest.mark.parametrize("build", TINY_BUILDS)
def test_adapter_save_load_gives_identical_outputs(build: str, tmp_path) -> None:
    vlm = tiny_identity_vlm(build)
    with torch.no_grad():  # a "trained" projector: anything but its init
        for p in vlm.adapter.projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    inputs, tokens = face_inputs(vlm, build)
    before = logits(vlm, inputs, tokens)
    vlm.save_pretrained(tmp_path)
    rows = ["placeholder_rows.safetensors"] if vlm.model_changes.rows_added else []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["README.md", "identity_adapter.safetensors", "identity_adapter_config.json", *rows]
    )
    assert json.loads((tmp_path / "identity_adapter_config.json").read_text())["family"] == vlm.family.name

    loaded = tiny_vlm_with_adapter(build, adapter=tmp_path)
    assert loaded.identity_tokens is True  # a loaded adapter injects by default
    assert float(loaded.adapter.projector.output_norm) == float(vlm.adapter.projector.output_norm)
    inputs2, tokens2 = face_inputs(loaded, build)
    assert torch.equal(logits(loaded, inputs2, tokens2), before)


@pytest.mark.parametrize("variant", ["trainable_tokens", "modules_to_save"])
@pytest.mark.parametrize("build", TINY_BUILDS)
def test_hook_survives_peft_and_lora_round_trips(build: str, variant: str, tmp_path) -> None:
    from peft import PeftModel

    vlm = tiny_identity_vlm(build)
    inputs, tokens = face_inputs(vlm, build)
    before = logits(vlm, inputs, tokens)
    spec = dict(  # peft.LoraConfig arguments; "<face>" becomes its id with this tokenizer
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        trainable_token_indices=["<face>"] if variant == "trainable_tokens" else None,
        modules_to_save=["embed_tokens"] if variant == "modules_to_save" else None,
    )
    original_embedding = vlm.model.get_input_embeddings()
    vlm.apply_lora(spec)
    wrapped = vlm.model.get_input_embeddings()
    assert wrapped is not original_embedding  # PEFT replaced the embedding module ...
    assert vlm.injector.hooked_module is wrapped  # ... and the hook followed it
    # LoRA starts as a no-op, so identical logits prove the identity tokens are still written.
    assert torch.equal(logits(vlm, inputs, tokens), before)
    lora_names = [n for n, _ in vlm.model.named_parameters() if "lora_" in n]
    assert lora_names and all("vision" not in n and "visual" not in n for n in lora_names)

    # A training step reaches the projector and LoRA through the hook.
    vlm.adapter.train()
    inputs, tokens = face_inputs(vlm, build)  # fresh tokens with a graph back to the projector
    vlm.forward(inputs, tokens, labels=inputs.inputs["input_ids"]).loss.backward()
    assert vlm.adapter.projector.fc2.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in vlm.model.named_parameters() if "lora_B" in n)
    vlm.adapter.eval()

    with torch.no_grad():  # "trained" LoRA and embedding deltas
        for p in vlm.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    tuned = logits(vlm, inputs, tokens)
    assert not torch.allclose(tuned, before)
    vlm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()

    loaded = tiny_vlm_with_adapter(build, adapter=tmp_path)
    assert isinstance(loaded.model, PeftModel)
    inputs2, tokens2 = face_inputs(loaded, build)
    torch.testing.assert_close(logits(loaded, inputs2, tokens2), tuned, rtol=1e-6, atol=1e-6)

    # PEFT loads the LoRA weights directly, once the base has the placeholder row.
    base = base_model(build).model
    ensure_embedding_row(base, vlm.processor.placeholder_id, len(vlm.processor.tokenizer))
    direct = PeftModel.from_pretrained(base, str(tmp_path))
    ours = dict(vlm.model.named_parameters())
    for name, param in direct.named_parameters():
        if "lora_B" in name:
            assert torch.equal(param, ours[name])
