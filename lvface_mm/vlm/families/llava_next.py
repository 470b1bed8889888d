"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`).

AnyRes tiling changes how many `<image>` tokens an image becomes (the processor computes it from
`image_sizes`), not how they are merged; identity tokens are text tokens and need nothing extra.
"""

from __future__ import annotations

from .base import VLMFamily, register_family


@register_family
class LlavaNextFamily(VLMFamily):
    name = "llava_next"
    config_class_names = ("transformers.LlavaNextConfig",)
