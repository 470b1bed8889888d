"""Face encoders: FaceViT, the model registry, official weights, checkpoint loading, inference
helpers and ONNX export/runtime (`onnx` / `onnxruntime` are imported only when used).

The eager re-implementation of the upstream forward (for parity checks and benchmarks) lives in
`lvface_mm.models.reference` and is not imported here.
"""

import sys

from .checkpoint import guess_variant, load_checkpoint, read_state_dict
from .data_config import FACE_CROP_MEAN, FACE_CROP_STD, normalize_crops
from .facevit import FaceViT, FaceViTConfig
from .factory import create_model
from .inference import DTYPE_NAMES, prepare_for_inference, resolve_dtype
from .onnx import OnnxEncoder, cached_onnx_export, export_onnx, onnx_cache_dir
from .pretrained import (
    ARCFACE_TEMPLATE_112,
    OFFICIAL_WEIGHTS,
    Preprocessing,
    PretrainedWeights,
    WeightsNotAvailableError,
    WeightsVerificationError,
    cached_weights_path,
    fetch_weights,
)
from .pretrained_dir import read_encoder_config, save_pretrained_encoder
from .registry import ModelSpec, get_model_spec, list_models, register_model
from .timm_models import register_with_timm

if "timm" in sys.modules:  # timm users get our names in timm.create_model; others don't pay timm's import
    register_with_timm()

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "DTYPE_NAMES",
    "FACE_CROP_MEAN",
    "FACE_CROP_STD",
    "OFFICIAL_WEIGHTS",
    "FaceViT",
    "FaceViTConfig",
    "ModelSpec",
    "OnnxEncoder",
    "Preprocessing",
    "PretrainedWeights",
    "WeightsNotAvailableError",
    "WeightsVerificationError",
    "cached_onnx_export",
    "cached_weights_path",
    "create_model",
    "export_onnx",
    "fetch_weights",
    "get_model_spec",
    "guess_variant",
    "list_models",
    "load_checkpoint",
    "normalize_crops",
    "onnx_cache_dir",
    "prepare_for_inference",
    "read_encoder_config",
    "read_state_dict",
    "register_model",
    "register_with_timm",
    "resolve_dtype",
    "save_pretrained_encoder",
]
