"""Training tasks: model + loss -> `forward(batch) -> {"loss": ..., <logged scalars>}`.

One task per training mode, all driven by the same loop (`training/loop.py`).
"""

from .encoder_lora import (
    DEFAULT_TARGETS,
    ENCODER_LORA_DEFAULTS,
    add_lora,
    encoder_lora_config,
    load_adapter,
    merge_adapter,
    save_adapter,
    unwrap_encoder,
)
from .face_recognition import FaceRecognitionTask, images_to_input

__all__ = [
    "DEFAULT_TARGETS",
    "ENCODER_LORA_DEFAULTS",
    "FaceRecognitionTask",
    "add_lora",
    "encoder_lora_config",
    "images_to_input",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
    "unwrap_encoder",
]
