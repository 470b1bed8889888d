"""Qwen2-VL and Qwen2.5-VL.

Quirks handled here:
- Positions are 3-D (M-RoPE), computed from `input_ids` plus `mm_token_type_ids` (0 text, 1 image,
  2 video). In transformers 5.x the model refuses image inputs without `mm_token_type_ids`.
  Identity tokens are text for M-RoPE (type 0): they advance all three position axes together, like
  the words around them. The processor already gives them 0; `check_inputs` enforces it.
- Besides the image and video pads, `<|vision_start|>`/`<|vision_end|>` are reserved.
- The vision tower's attention layers are named `attn.qkv`/`attn.proj`, so the default LoRA regex
  (`q_proj` ... under `language_model`) cannot land in it.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import VLMFamily, register_family


@register_family
class Qwen2VLFamily(VLMFamily):
    name = "qwen2_vl"
    config_class_names = ("transformers.Qwen2VLConfig", "transformers.Qwen2_5_VLConfig")
    box_format = "qwen"  # <|box_start|>(x1,y1),(x2,y2)<|box_end|> on the 0-1000 grid

    def reserved_token_ids(self, config: Any) -> set[int]:
        ids = super().reserved_token_ids(config)
        for attr in ("vision_start_token_id", "vision_end_token_id"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                ids.add(value)
        return ids

    def check_inputs(self, inputs: dict[str, torch.Tensor], placeholder_id: int) -> dict[str, torch.Tensor]:
        has_vision = inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None
        types = inputs.get("mm_token_type_ids")
        if types is None:
            if has_vision:
                raise ValueError(
                    "Qwen2-VL inputs with images need `mm_token_type_ids` (returned by the Qwen2-VL processor) "
                    "to compute M-RoPE positions"
                )
            return inputs
        face = inputs["input_ids"] == placeholder_id  # (B, T)
        if bool((types[face] != 0).any()):
            # Identity tokens are text for M-RoPE; a non-zero type would give them image grid positions.
            inputs = {**inputs, "mm_token_type_ids": types.masked_fill(face, 0)}
        return inputs
