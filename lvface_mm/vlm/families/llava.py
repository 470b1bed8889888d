"""LLaVA-1.5 (`LlavaForConditionalGeneration`).

The reference for everything else: `<image>` is expanded by the processor to one token per vision
patch, and `LlavaModel.forward` embeds the ids first and merges image features second, so identity
tokens written by the embedding hook and image features never touch the same positions. No quirk
needs handling beyond the defaults.
"""

from __future__ import annotations

from .base import SquareGridRegions, VLMFamily, register_family


@register_family
class LlavaFamily(SquareGridRegions, VLMFamily):
    name = "llava"
    config_class_names = ("transformers.LlavaConfig",)
