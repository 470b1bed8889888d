"""Face encoders: FaceViT, the model registry, official weights and checkpoint loading.

`export_onnx` / `OnnxEncoder` live in `lvface_mm.models.onnx` (needs the `onnx` extra) and the
eager upstream forward in `lvface_mm.models.reference`; neither is imported here.
"""

import sys

from .checkpoint import guess_variant, load_checkpoint, read_state_dict
from .facevit import FaceViT, FaceViTConfig
from .pretrained import (
    ARCFACE_TEMPLATE_112,
    OFFICIAL_WEIGHTS,
    Preprocessing,
    PretrainedWeights,
    WeightsNotAvailableError,
    fetch_weights,
)
from .registry import ModelSpec, create_model, get_model_spec, list_models, register_model
from .timm_models import register_with_timm

if "timm" in sys.modules:  # timm users get our names in timm.create_model; others don't pay timm's import
    register_with_timm()

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "OFFICIAL_WEIGHTS",
    "FaceViT",
    "FaceViTConfig",
    "ModelSpec",
    "Preprocessing",
    "PretrainedWeights",
    "WeightsNotAvailableError",
    "create_model",
    "fetch_weights",
    "get_model_spec",
    "guess_variant",
    "list_models",
    "load_checkpoint",
    "read_state_dict",
    "register_model",
]
