"""Idefics3 and SmolVLM (SmolVLM-256M/500M/2B-Instruct are Idefics3 checkpoints; SmolVLM2 has its own classes).

Quirks handled here:
- The processor takes one list of images per prompt, and expands each `<image>` into
  `<fake_token_around_image><global-img><image>*L<fake_token_around_image>` blocks (plus row/column
  tiles when splitting); all of those are text tokens except `<image>` itself.
- The language model lives at `model.text_model`, and the SigLIP tower also has `q_proj`/`k_proj`/
  `v_proj`, so the LoRA regex must be scoped to `text_model`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .base import VLMFamily, register_family


@register_family
class Idefics3Family(VLMFamily):
    name = "idefics3"
    config_class_names = ("transformers.Idefics3Config", "transformers.SmolVLMConfig")
    default_lora_targets = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj)"

    def input_only_token_ids(self, config: Any, tokenizer: Any) -> set[int]:
        # The image block's scaffolding (`<fake_token_around_image>`, `<global-img>`, `<row_i_col_j>`)
        # is text to the model but only ever written by the processor.
        ids = super().input_only_token_ids(config, tokenizer)
        scaffold = re.compile(r"<fake_token_around_image>|<global-img>|<row_\d+_col_\d+>")
        ids |= {int(i) for tok, i in tokenizer.get_vocab().items() if scaffold.fullmatch(tok)}
        return ids

    def encode(self, processor: Any, texts: list[str], images: list[list[Any]] | None) -> dict[str, torch.Tensor]:
        if images is None or not any(images):
            return dict(processor(text=texts, return_tensors="pt", padding=True))
        return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
