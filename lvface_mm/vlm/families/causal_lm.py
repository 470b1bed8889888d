"""Text-only causal LMs (Llama, Qwen2/2.5, SmolLM2, Gemma, ...): any model type that transformers
maps to `AutoModelForCausalLM`.

There is no image: identity tokens are the only non-text input, written by the same hook. The
family matches by model type through transformers' own causal-LM mapping and is consulted only
after every VLM family declined, so a VLM config never lands here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import VLMFamily, register_family


@register_family
class CausalLMFamily(VLMFamily):
    name = "causal_lm"
    text_only = True
    default_lora_targets = r".*\.(q_proj|k_proj|v_proj|o_proj)"
    auto_model_class = "AutoModelForCausalLM"

    def matches(self, config: Any) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def hidden_size(self, config: Any) -> int:
        return int(config.get_text_config().hidden_size)

    def embedding_scale(self, model: nn.Module) -> float:
        # Gemma-family LLMs scale embeddings inside the module in transformers 5.x (see paligemma.py).
        scale = getattr(model.get_input_embeddings(), "embed_scale", None)
        return 1.0 if scale is None else float(scale)

    def load_processor(self, model_id: str, **kwargs: Any) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_id, **kwargs)

    def user_content(self, text: str, num_images: int) -> str:
        if num_images:
            raise ValueError("a text-only LLM cannot take images; use prompt or identity-token grounding only")
        return text

    def encode(self, processor: Any, texts: list[str], images: list[list[Any]] | None) -> dict[str, torch.Tensor]:
        if images is not None and any(images):
            raise ValueError("a text-only LLM cannot take images")
        tokenizer = self.tokenizer_of(processor)
        # A chat template that already wrote BOS must not get a second one from the tokenizer.
        bos = tokenizer.bos_token
        add_special = not (bos and all(t.startswith(bos) for t in texts))
        return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special))
