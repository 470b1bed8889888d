"""Training tasks: model + loss -> `forward(batch) -> {"loss": ..., <logged scalars>}`.

One task per training mode, all driven by the same loop (`training/loop.py`).
"""

from .encoder_lora import (
    DEFAULT_TARGETS,
    EncoderLoraConfig,
    add_lora,
    load_adapter,
    merge_adapter,
    save_adapter,
    unwrap_encoder,
)
from .face_recognition import FaceRecognitionTask, images_to_input

__all__ = [
    "DEFAULT_TARGETS",
    "EncoderLoraConfig",
    "FaceRecognitionTask",
    "add_lora",
    "images_to_input",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
    "unwrap_encoder",
]
