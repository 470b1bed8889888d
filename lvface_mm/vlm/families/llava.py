"""LLaVA-1.5 (`LlavaForConditionalGeneration`).

The reference for everything else: `<image>` is expanded by the processor to one token per vision
patch, and `LlavaModel.forward` embeds the ids first and merges image features second, so identity
tokens written by the embedding hook and image features never touch the same positions. No quirk
needs handling beyond the defaults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import VLMFamily, register_family


@register_family
class LlavaFamily(VLMFamily):
    name = "llava"
    config_class_names = ("transformers.LlavaConfig",)
    supports_region_features = True

    def picture_patches(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        out = model.get_image_features(pixel_values=pixel_values, return_dict=True)
        feats = torch.stack(list(out.pooler_output))  # (B, P, d) after the multi-modal projector
        P = feats.shape[1]
        if math.isqrt(P) ** 2 != P and math.isqrt(P - 1) ** 2 == P - 1:
            feats = feats[:, 1:]  # vision_feature_select_strategy "full" keeps CLS first
        return feats

    def region_boxes(
        self, boxes: Sequence[Sequence[float]], width: float, height: float, processor: Any
    ) -> torch.Tensor:
        from ..regions import person_region, processed_box

        image_processor = getattr(processor, "image_processor", processor)
        rows = [processed_box(person_region(b, width, height), width, height, image_processor) for b in boxes]
        return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)  # (F, 4)
