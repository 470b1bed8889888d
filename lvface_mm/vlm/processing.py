"""The `<face>` placeholder: tokenizer entry, embedding row, and prompt expansion.

A prompt refers to faces with `<face>` (the next face, in order) or `<face_i>` (the face with index
i). Before tokenising, each reference becomes K consecutive `<face>` tokens, the way transformers'
processors expand one `<image>` into one token per image feature; the processor then tokenises as
usual, and the injector later writes K identity tokens over each group. `<face>` is a special token
of the tokenizer (never split, dropped by `skip_special_tokens`), and a text token for every family
(type 0 in Qwen's `mm_token_type_ids`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import IdentityAdapterConfig
from .families import VLMFamily
from .injection import FaceCountError


def face_reference_pattern(placeholder_token: str) -> re.Pattern[str]:
    """Regex matching `<face>` and `<face_i>` for a placeholder such as "<face>"."""
    stem = placeholder_token[1:-1]
    return re.compile(rf"<{re.escape(stem)}(?:_(\d+))?>")


def expand_face_placeholders(
    text: str, num_faces: int, num_id_tokens: int, placeholder_token: str = "<face>"
) -> tuple[str, list[int]]:
    """Expand face references in one prompt.

    Args:
        text: prompt with `<face>` / `<face_i>` references (not yet expanded).
        num_faces: faces available for this prompt.
        num_id_tokens: K.
        placeholder_token: the placeholder, e.g. "<face>".

    Returns:
        The text with every reference replaced by K placeholders, and the face index of each
        reference in text order.

    Raises:
        FaceCountError: a reference points past the faces given.
    """
    order: list[int] = []
    next_plain = 0

    def expand(match: re.Match[str]) -> str:
        nonlocal next_plain
        if match.group(1) is None:
            index, next_plain = next_plain, next_plain + 1
        else:
            index = int(match.group(1))
        if index >= num_faces:
            raise FaceCountError(
                f"the prompt refers to face {index} ({match.group(0)!r}, reference #{len(order) + 1}) "
                f"but {num_faces} face(s) were given"
            )
        order.append(index)
        return placeholder_token * num_id_tokens

    return face_reference_pattern(placeholder_token).sub(expand, text), order


def add_placeholder_token(tokenizer: Any, placeholder_token: str) -> int:
    """Add the placeholder as a special token (idempotent) and return its id."""
    from transformers import AddedToken

    if placeholder_token not in tokenizer.get_vocab():
        token = AddedToken(placeholder_token, special=True, normalized=False, lstrip=False, rstrip=False)
        tokenizer.add_tokens([token], special_tokens=True)
    ids = tokenizer.encode(placeholder_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{placeholder_token!r} does not tokenise to one token (got {ids}); pick another placeholder")
    return int(ids[0])


@torch.no_grad()
def ensure_embedding_row(model: nn.Module, token_id: int, vocab_size: int) -> bool:
    """Give `token_id` an embedding row, resizing only when the table is too small.

    Many checkpoints pad their embedding table past the tokenizer (Qwen2: 151936 rows for ~151.7k
    tokens), so the new token often fits and the model is untouched. When it does not, the table
    (and an untied LM head) grow, and new rows are set to the mean of the old ones: deterministic,
    so a reloaded adapter sees the same model, and in range, so the placeholder's own logit stays
    ordinary (generation suppresses it anyway).

    Returns:
        True when the model was resized.
    """
    embedding = model.get_input_embeddings()
    old_rows = embedding.weight.shape[0]
    if token_id < old_rows:
        return False
    new_rows = max(vocab_size, token_id + 1)
    model.resize_token_embeddings(new_rows, mean_resizing=False)
    embedding = model.get_input_embeddings()
    embedding.weight[old_rows:] = embedding.weight[:old_rows].mean(dim=0)
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != embedding.weight.data_ptr():
        output.weight[old_rows:] = output.weight[:old_rows].mean(dim=0)
        if getattr(output, "bias", None) is not None:
            output.bias[old_rows:] = output.bias[:old_rows].mean()
    return True


@dataclass(frozen=True)
class IdentityInputs:
    """Model inputs plus which face each placeholder group refers to.

    Attributes:
        inputs: tensors for the model's forward/generate (input_ids, attention_mask, pixel_values, ...).
        face_order: per prompt, the face index of each placeholder group in text order.
    """

    inputs: dict[str, torch.Tensor]
    face_order: tuple[tuple[int, ...], ...]

    @property
    def batch_size(self) -> int:
        return int(self.inputs["input_ids"].shape[0])


class IdentityProcessor:
    """Wraps a VLM processor (or an LLM tokenizer): adds `<face>`, expands face references, then processes.

    Args:
        processor: the model's processor, or its tokenizer for text-only LLMs.
        config: the adapter config (placeholder token and K).
        family: the model's family (how its processor is called and how images appear in chat).
    """

    def __init__(self, processor: Any, config: IdentityAdapterConfig, family: VLMFamily) -> None:
        self.processor = processor
        self.config = config
        self.family = family
        self.placeholder_token = config.placeholder_token
        self.num_id_tokens = config.num_id_tokens
        self.placeholder_id = add_placeholder_token(self.tokenizer, self.placeholder_token)

    @property
    def tokenizer(self) -> Any:
        return self.family.tokenizer_of(self.processor)

    def expand(self, text: str, num_faces: int) -> tuple[str, list[int]]:
        return expand_face_placeholders(text, num_faces, self.num_id_tokens, self.placeholder_token)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """Chat messages -> prompt text (with the family's image markers and any `<face>` references)."""
        return self.family.render_prompt(self.processor, messages)

    def __call__(
        self,
        text: str | Sequence[str],
        images: Any = None,
        num_faces: int | Sequence[int] = 0,
    ) -> IdentityInputs:
        """Expand face references and run the processor.

        Args:
            text: one prompt or a batch, with `<face>`/`<face_i>` references.
            images: None, one image (single prompt), one image per prompt, or one list of images per prompt.
            num_faces: faces available per prompt (an int applies to every prompt).

        Raises:
            FaceCountError: a reference points past the faces given.
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text must hold at least one prompt")
        counts = [num_faces] * len(texts) if isinstance(num_faces, int) else list(num_faces)
        if len(counts) != len(texts):
            raise ValueError(f"num_faces has {len(counts)} entries for {len(texts)} prompts")
        expanded, order = [], []
        for i, (t, n) in enumerate(zip(texts, counts)):
            try:
                e, o = self.expand(t, n)
            except FaceCountError as err:
                raise FaceCountError(f"prompt {i}: {err}") from None
            expanded.append(e)
            order.append(tuple(o))
        inputs = self.family.encode(self.processor, expanded, _images_per_prompt(images, len(texts)))
        inputs = self.family.check_inputs(inputs, self.placeholder_id)
        return IdentityInputs(inputs=inputs, face_order=tuple(order))

    def batch_decode(self, sequences: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)


def _images_per_prompt(images: Any, batch: int) -> list[list[Any]] | None:
    if images is None:
        return None
    if not isinstance(images, (list, tuple)):
        if batch != 1:
            raise ValueError(f"one image was given for {batch} prompts; pass one image (or list) per prompt")
        return [[images]]
    if len(images) != batch:
        raise ValueError(f"images has {len(images)} entries for {batch} prompts; pass one image or list per prompt")
    return [list(item) if isinstance(item, (list, tuple)) else ([] if item is None else [item]) for item in images]


__all__ = [
    "IdentityInputs",
    "IdentityProcessor",
    "add_placeholder_token",
    "ensure_embedding_row",
    "expand_face_placeholders",
    "face_reference_pattern",
]
