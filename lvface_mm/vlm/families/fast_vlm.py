"""FastVLM (`FastVlmForConditionalGeneration`): LLaVA's layout around a timm vision tower.

The tower is a `TimmWrapperModel` whose last feature map (B, C, h, w) is flattened row-major into
h*w image tokens, with no CLS and the "full" feature strategy; the processor is LLaVA's (one
`<image>` expanded to h*w tokens, `patch_size` = the tower's output stride). Apple's FastVLM uses a
FastViTHD tower; any timm backbone fits, which is how a small ImageNet-pretrained CNN becomes the eyes
of a VLM on a CPU (`lvface_mm.vlm.testing.fast_vlm_from_causal_lm`). Injection needs nothing
beyond the defaults: `FastVlmModel.forward` embeds the ids first and merges image features second,
as LLaVA does. Region features read the square feature map like LLaVA-1.5's patch grid.
"""

from __future__ import annotations

from .base import SquareGridRegions, VLMFamily, register_family


@register_family
class FastVlmFamily(SquareGridRegions, VLMFamily):
    name = "fast_vlm"
    config_class_names = ("transformers.FastVlmConfig",)
