"""PaliGemma.

Quirks handled here:
- Gemma multiplies token embeddings by sqrt(hidden). In transformers 5.x the multiplication lives in
  the embedding module itself (`GemmaTextScaledWordEmbedding.embed_scale`), so the embedding hook
  sees already-scaled rows and identity tokens must match the norm of the *scaled* embeddings:
  `embedding_scale` reports that factor. (In 4.x the decoder scaled all inputs after the lookup.)
- There is no chat template: the prompt is the images' `<image>` tokens followed by the text; the
  processor inserts BOS after the last image token and a newline at the end. Image and prompt form a
  prefix that attends bidirectionally (`token_type_ids` 0), so identity tokens in the prompt see
  the image and the image sees them.
- The processor requires an image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import SquareGridRegions, VLMFamily, register_family


@register_family
class PaliGemmaFamily(SquareGridRegions, VLMFamily):
    name = "paligemma"
    config_class_names = ("transformers.PaliGemmaConfig",)
    box_format = "paligemma"  # <locNNNN> x4, y before x, 1024 bins

    def embedding_scale(self, model: nn.Module) -> float:
        scale = getattr(model.get_input_embeddings(), "embed_scale", None)
        return 1.0 if scale is None else float(scale)

    def render_prompt(self, processor: Any, messages: list[dict[str, Any]]) -> str:
        parts = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                parts.append(content)
                continue
            for item in content:
                parts.append(processor.image_token if item["type"] == "image" else item["text"])
        return "".join(parts)

    def render_answer(self, processor: Any, messages: list[dict[str, Any]], answer: str) -> str:
        # No chat template: the answer is the processor's `suffix` (see `encode_answer`).
        return self.render_prompt(processor, messages)

    def encode_answer(
        self, processor: Any, prompt: str, full: str, answer: str, images: list[list[Any]] | None
    ) -> dict[str, torch.Tensor]:
        # PaliGemma's processor writes the answer after the prefix's "\n", appends EOS, masks the
        # prefix (image, BOS, prompt) in `labels` and marks the suffix in `token_type_ids`.
        if images is None or not all(images):
            raise ValueError("PaliGemma needs at least one image per prompt (its processor has no text-only mode)")
        return dict(processor(text=[prompt], images=images, suffix=[answer], return_tensors="pt", padding=True))

    def encode(self, processor: Any, texts: list[str], images: list[list[Any]] | None) -> dict[str, torch.Tensor]:
        if images is None or not all(images):
            raise ValueError("PaliGemma needs at least one image per prompt (its processor has no text-only mode)")
        inputs = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
        inputs.pop("labels", None)  # the processor's training labels (prefix masked); not a model input here
        return inputs
