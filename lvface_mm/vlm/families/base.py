"""What every VLM family provides to the bridge, and the registry that finds a family for a model.

A family is the place for one model family's quirks and nowhere else: which config classes it
covers, which token ids it already reserves for images, how an image is written in a chat message,
how its processor is called, which extra inputs its forward needs, the scale its embedding module
applies, and where LoRA goes. The generic code (injection, projector, processor wrapper, grounding)
asks the family and never looks at model names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn


class VLMFamily:
    """Defaults fit LLaVA-style models: override what differs in the family's own file."""

    name: ClassVar[str] = ""
    # Fully qualified transformers config class names this family covers ("transformers.LlavaConfig").
    config_class_names: ClassVar[tuple[str, ...]] = ()
    text_only: ClassVar[bool] = False
    # LoRA on the language model's attention projections only; `.*` prefixes tolerate both the 4.x
    # (`language_model.model.layers`) and the 5.x (`model.language_model.layers`) module paths.
    default_lora_targets: ClassVar[str] = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
    auto_model_class: ClassVar[str] = "AutoModelForImageTextToText"
    # How face boxes are written in prompts (`lvface_mm.vlm.boxes`): the family's native notation.
    box_format: ClassVar[str] = "normalized"

    # -- matching ---------------------------------------------------------------------------------
    def config_classes(self) -> tuple[type, ...]:
        import transformers

        return tuple(getattr(transformers, name.rsplit(".", 1)[-1]) for name in self.config_class_names)

    def matches(self, config: Any) -> bool:
        return isinstance(config, self.config_classes())

    # -- model facts ------------------------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        return config.get_text_config()

    def hidden_size(self, config: Any) -> int:
        return int(self.text_config(config).hidden_size)

    def reserved_token_ids(self, config: Any) -> set[int]:
        """Token ids the model already uses for images/video; the placeholder must not be one of them."""
        ids = set()
        for attr in ("image_token_id", "image_token_index", "video_token_id"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                ids.add(value)
        return ids

    def input_only_token_ids(self, config: Any, tokenizer: Any) -> set[int]:
        """Ids a generated answer must never contain: the model's image/video markers (input-only)."""
        return self.reserved_token_ids(config)

    def format_box(self, box: Sequence[float], width: float, height: float) -> str:
        """A face box (pixels of a `width` x `height` picture) in the family's native notation."""
        from ..boxes import format_box

        return format_box(self.box_format, box, width, height)

    def embedding_scale(self, model: nn.Module) -> float:
        """Factor the input-embedding module applies after the table lookup (1 for most models)."""
        return 1.0

    def token_embedding_norm(self, model: nn.Module, exclude: Sequence[int] = ()) -> float:
        """Mean L2 norm of the token embeddings as the decoder sees them (after any embedding scale)."""
        weight = model.get_input_embeddings().weight  # (V, D)
        with torch.no_grad():
            norms = weight.detach().float().norm(dim=-1)  # (V,)
            drop = [i for i in exclude if 0 <= i < norms.shape[0]]
            if drop:
                keep = torch.ones_like(norms, dtype=torch.bool)
                keep[torch.as_tensor(drop, dtype=torch.long)] = False
                norms = norms[keep]
        return float(norms.mean()) * self.embedding_scale(model)

    # -- region features (`lvface_mm.vlm.regions`) ------------------------------------------------
    # Families whose patch grid and processor geometry `picture_patches` / `region_boxes` know.
    supports_region_features: ClassVar[bool] = False

    def picture_patches(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, ...) pixel values -> (B, G*G, d) patch features as the model merges them (row-major)."""
        raise ValueError(
            f"region features are not supported for the {self.name!r} family (its patch grid is not "
            "a fixed square); use region_features: false"
        )

    def region_boxes(
        self, boxes: Sequence[Sequence[float]], width: float, height: float, processor: Any
    ) -> torch.Tensor:
        """Face boxes (pixels) -> (F, 4) their person regions as fractions of the processed picture."""
        raise ValueError(f"region features are not supported for the {self.name!r} family")

    # -- loading ----------------------------------------------------------------------------------
    def load_model(self, model_id: str, **kwargs: Any) -> nn.Module:
        import transformers

        return getattr(transformers, self.auto_model_class).from_pretrained(model_id, **kwargs)

    def load_processor(self, model_id: str, **kwargs: Any) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_id, **kwargs)

    def tokenizer_of(self, processor: Any) -> Any:
        return getattr(processor, "tokenizer", processor)

    # -- prompts ----------------------------------------------------------------------------------
    def user_content(self, text: str, num_images: int) -> str | list[dict[str, str]]:
        """The `content` of a chat message holding `num_images` images followed by `text`."""
        return [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]

    def render_prompt(self, processor: Any, messages: list[dict[str, Any]]) -> str:
        """Chat messages -> prompt text with the family's image markers, ready for the processor."""
        template_owner = processor if getattr(processor, "chat_template", None) else self.tokenizer_of(processor)
        if not getattr(template_owner, "chat_template", None):
            raise ValueError(
                f"{type(processor).__name__} has no chat template; set `processor.chat_template` "
                "or pass a ready prompt to IdentityVLM.generate"
            )
        return template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def render_answer(self, processor: Any, messages: list[dict[str, Any]], answer: str) -> str:
        """Prompt + assistant answer as the chat template writes a finished turn (training text).

        The result always starts with `render_prompt(messages)`. When the template closes an
        assistant turn with nothing (llava-1.5's "ASSISTANT: answer"), the tokenizer's EOS is
        appended: without it the model is never taught to stop.
        """
        prompt = self.render_prompt(processor, messages)
        template_owner = processor if getattr(processor, "chat_template", None) else self.tokenizer_of(processor)
        turn = {"role": "assistant", "content": self.user_content(answer, 0)}
        full = template_owner.apply_chat_template([*messages, turn], add_generation_prompt=False, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                "the chat template does not render turns incrementally (the prompt is not a prefix of prompt + "
                "answer), so answer tokens cannot be located; use a template whose output for n turns extends n - 1"
            )
        if full.rstrip().endswith(answer.strip()):
            eos = self.tokenizer_of(processor).eos_token
            if not eos:
                raise ValueError("the chat template writes no end of turn and the tokenizer has no EOS token")
            full += eos
        return full

    def encode_answer(
        self, processor: Any, prompt: str, full: str, answer: str, images: list[list[Any]] | None
    ) -> dict[str, torch.Tensor]:
        """One training example: the processor's inputs for `full` plus `labels` (-100 on the prompt,
        its image tokens and padding; the answer's tokens, end of turn included, elsewhere)."""
        prompt_ids = self.encode(processor, [prompt], images)["input_ids"][0]
        inputs = self.encode(processor, [full], images)
        ids = inputs["input_ids"][0]
        n = len(prompt_ids)
        if len(ids) <= n or not torch.equal(ids[:n], prompt_ids):
            raise ValueError(
                f"the answer {answer!r} does not tokenise as a continuation of its prompt; the prompt's tokens "
                "change when the answer is appended"
            )
        labels = ids.clone()
        labels[:n] = -100
        inputs["labels"] = labels[None]
        return inputs

    # -- processing -------------------------------------------------------------------------------
    def encode(self, processor: Any, texts: list[str], images: list[list[Any]] | None) -> dict[str, torch.Tensor]:
        """Run the family's processor: one list of images per prompt (or None for text only)."""
        flat = None if images is None else [img for row in images for img in row]
        if flat is not None and not flat:
            flat = None
        return dict(processor(text=texts, images=flat, return_tensors="pt", padding=True))

    def check_inputs(self, inputs: dict[str, torch.Tensor], placeholder_id: int) -> dict[str, torch.Tensor]:
        """Last look at the model inputs before forward/generate; families fix or reject what they must."""
        return inputs


# -- registry ---------------------------------------------------------------------------------------
_FAMILIES: dict[str, VLMFamily] = {}


class SquareGridRegions:
    """Region features for families that merge one square patch grid per picture, made by resizing
    (with an optional pad to a square or centre crop) the whole picture to one size: LLaVA-1.5, FastVLM and
    PaliGemma. Listed before `VLMFamily` in the bases so its methods win."""

    supports_region_features: ClassVar[bool] = True

    def picture_patches(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        out = model.get_image_features(pixel_values=pixel_values, return_dict=True)
        feats = torch.stack(list(out.pooler_output))  # (B, P, d) after the multi-modal projector
        P = feats.shape[1]
        if math.isqrt(P) ** 2 != P and math.isqrt(P - 1) ** 2 == P - 1:
            feats = feats[:, 1:]  # LLaVA's vision_feature_select_strategy "full" keeps CLS first
        return feats

    def region_boxes(
        self, boxes: Sequence[Sequence[float]], width: float, height: float, processor: Any
    ) -> torch.Tensor:
        from ..regions import person_region, processed_box

        image_processor = getattr(processor, "image_processor", processor)
        rows = [processed_box(person_region(b, width, height), width, height, image_processor) for b in boxes]
        return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)  # (F, 4)


def register_family(cls: type[VLMFamily]) -> type[VLMFamily]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a `name`")
    if cls.name in _FAMILIES:
        raise ValueError(f"family {cls.name!r} is already registered")
    _FAMILIES[cls.name] = cls()
    return cls


def _load_builtins() -> None:
    from . import causal_lm, fast_vlm, idefics3, llava, llava_next, paligemma, qwen2_vl  # noqa: F401


def list_families() -> list[str]:
    _load_builtins()
    return sorted(_FAMILIES)


def get_family(name: str) -> VLMFamily:
    _load_builtins()
    if name not in _FAMILIES:
        raise ValueError(f"unknown VLM family {name!r}; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def family_for_config(config: Any) -> VLMFamily:
    """The family whose config classes include `type(config)`; text-only causal LMs fall back to `causal_lm`."""
    _load_builtins()
    matches = [f for f in _FAMILIES.values() if not f.text_only and f.matches(config)]
    if len(matches) > 1:
        raise ValueError(f"{type(config).__name__} matches several families: {[f.name for f in matches]}")
    if matches:
        return matches[0]
    fallback = [f for f in _FAMILIES.values() if f.text_only and f.matches(config)]
    if fallback:
        return fallback[0]
    raise ValueError(
        f"no VLM family supports {type(config).__name__} (model_type {getattr(config, 'model_type', None)!r}); "
        f"supported families: {', '.join(sorted(_FAMILIES))}. Register one with `register_family`."
    )


def family_for_model(model: nn.Module) -> VLMFamily:
    return family_for_config(model.config)
