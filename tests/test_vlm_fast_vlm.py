"""FastVLM with a timm tower: the ImageNet MobileNetV2 weights map onto timm exactly, the frozen
tower keeps its BatchNorm statistics in training, and the scenes recipe builds around a given LLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lvface_mm.tasks.identity_adapter import IdentityAdapterTask
from lvface_mm.vlm import IdentityVLM
from lvface_mm.vlm.imagenet_towers import (
    find_mobilenet_v2_weights,
    imagenet_mobilenet_v2_state,
    timm_mobilenet_v2_state,
)
from lvface_mm.vlm.testing import build_tiny_vlm, fast_vlm_from_causal_lm, tiny_card

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]


def _torchvision_mobilenet(seed: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2()
    # Non-trivial BatchNorm statistics, so a mix-up of running_mean/var or of layers shows.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_torchvision_mobilenet_v2_maps_onto_timm_exactly() -> None:
    import timm

    reference = _torchvision_mobilenet(seed=0)
    timm_model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0).eval()
    timm_model.load_state_dict(timm_mobilenet_v2_state(reference.state_dict()), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = reference.features(x)  # (2, 1280, 3, 3)
        got = timm_model.forward_features(x)
    assert got.shape == want.shape == (2, 1280, 3, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weights_that_are_not_mobilenet_v2_are_named(tmp_path: Path) -> None:
    import torchvision

    with pytest.raises(ValueError, match="not torchvision's MobileNetV2"):
        timm_mobilenet_v2_state(torchvision.models.resnet18().state_dict())
    state = _torchvision_mobilenet(seed=1).state_dict()
    state["features.0.0.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ValueError, match=r"features\.0\.0\.weight.*conv_stem\.weight"):
        timm_mobilenet_v2_state(state)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        find_mobilenet_v2_weights(tmp_path / "missing.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth is not a readable torch state dict"):
        imagenet_mobilenet_v2_state(broken)


def test_a_frozen_tower_keeps_its_batchnorm_statistics_while_training() -> None:
    # The recipe's builder: a tiny LLM in a FastVLM with a (random) MobileNetV2 tower at 64 px.
    lm = build_tiny_vlm("causal_lm")
    tiny = fast_vlm_from_causal_lm(lm.model, lm.tokenizer, image_size=64)
    vlm = IdentityVLM.from_pretrained(
        tiny.model, processor=tiny.processor, adapter=tiny_card("fast_vlm"), encoder_pretrained=False
    )
    tower = vlm.model.model.vision_tower
    norms = [m for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    before = [m.running_mean.clone() for m in norms]
    vlm.model.requires_grad_(False)  # as training freezes the base (PEFT), projector aside
    task = IdentityAdapterTask(vlm)
    task.train()
    assert task.training and vlm.adapter.projector.training
    assert not any(m.training for m in norms)
    tower(torch.randn(2, 3, 64, 64) * 3 + 1)
    for m, mean in zip(norms, before):
        assert torch.equal(m.running_mean, mean)
    # A tower being tuned in full (its BatchNorm trainable) follows train mode as usual.
    for p in tower.parameters():
        p.requires_grad_(True)
    task.train()
    assert all(m.training for m in norms)


def test_fastvlm_scenes_recipe_wraps_the_llm_and_loads_the_tower_weights(tmp_path: Path) -> None:
    """smollm2_fastvlm_scenes.yaml with a small LLM and a MobileNetV2 .pth: card tiny-fastvlm +
    model_path wraps that LLM unchanged in a FastVLM whose tower holds those weights; LoRA lands in
    the tower's last convolution only."""
    from safetensors import safe_open
    from transformers import FastVlmForConditionalGeneration

    from lvface_mm.vqa.scenes import ScenesConfig, build_scenes_vqa
    from lvface_mm.vqa.schema import load_samples
    from lvface_mm.vqa.testing import TinyLLMConfig, tiny_llm_for_samples
    from training.adapter import main

    data = tmp_path / "scenes"
    scenes = ScenesConfig(num_identities=12, num_unseen=4, train_per_task=4, eval_per_task=2, name_pool_size=120)
    build_scenes_vqa(data, scenes)
    small = TinyLLMConfig(hidden_size=48, num_hidden_layers=1)
    lm, tokenizer = tiny_llm_for_samples(load_samples(data / "train.json"), small)
    lm_dir = tmp_path / "lm"
    lm.save_pretrained(str(lm_dir))
    tokenizer.save_pretrained(str(lm_dir))
    weights = tmp_path / "mobilenet_v2.pth"
    torch.save(_torchvision_mobilenet(seed=2).state_dict(), weights)
    run = tmp_path / "run"
    argv = [
        "--config",
        str(ROOT / "training" / "configs" / "adapter" / "smollm2_fastvlm_scenes.yaml"),
        f"--data.path={data}",
        f"--output_dir={run}",
        f"--model.model_path={lm_dir}",
        f"--model.vision_weights={weights}",
        "--stage2.max_steps=1",
        "--stage2.batch_size=2",
        "--eval.enabled=false",
    ]
    assert main(argv) == 0
    base = json.loads((run / "base" / "config.json").read_text())
    assert base["model_type"] == "fast_vlm" and base["image_seq_length"] == 100  # 320 px / stride 32
    vlm = FastVlmForConditionalGeneration.from_pretrained(str(run / "base"))
    wrapped = vlm.model.language_model.state_dict()
    for name, value in lm.model.state_dict().items():
        assert torch.equal(wrapped[name][: value.shape[0]], value), name
    tower = vlm.model.vision_tower.timm_model.state_dict()
    torch.testing.assert_close(tower["conv_stem.weight"], torch.load(weights)["features.0.0.weight"])
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        lora = [k for k in f.keys() if "lora_" in k]  # noqa: SIM118 (safe_open is not iterable)
    assert lora and all(".vision_tower.timm_model.conv_head." in k for k in lora), lora[:3]


def test_vision_weights_belong_to_the_fastvlm_card() -> None:
    from training.adapter import AdapterModelConfig

    with pytest.raises(ValueError, match="model.vision_weights='imagenet' is for card 'tiny-fastvlm'"):
        AdapterModelConfig(card="tiny-llava", vision_weights="imagenet")
