"""Prompt grounding: who is in the picture, written into the chat prompt. No training needed.

Faces are matched against a gallery at its calibrated threshold; accepted matches keep their name,
everything else is "an unknown person". Each face is listed with its number, its horizontal position
(left / centre / right third of the picture) and its box, followed by an instruction not to invent
names. The text goes into the user turn of a normal chat conversation and is rendered with the
model's own chat template (`apply_chat_template`), so it works with any chat VLM or LLM in
transformers; the user turn rather than a system turn, because several templates (Gemma's, for one)
reject system messages.

With a trained adapter, each face line also carries a `<face_i>` reference: the identity tokens of
that face then sit right next to its name and position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .results import UNKNOWN_PERSON, Box, GroundedFace, Position


class IdentificationLike(Protocol):
    name: str | None
    score: float
    identity_id: int | None


class GalleryLike(Protocol):
    """What grounding needs from a gallery (`lvface_mm.gallery.Gallery` fits)."""

    def identify(self, embeddings: np.ndarray) -> Sequence[IdentificationLike]: ...


def horizontal_position(box: Sequence[float], image_width: float) -> Position:
    """Which third of the picture holds the box centre (from the viewer's side)."""
    if image_width <= 0:
        raise ValueError(f"image_width must be > 0, got {image_width!r}")
    centre = (float(box[0]) + float(box[2])) / 2.0 / image_width
    if centre < 1.0 / 3.0:
        return "left"
    if centre > 2.0 / 3.0:
        return "right"
    return "centre"


def ground_faces(
    boxes: Sequence[Sequence[float]] | np.ndarray,
    image_width: float,
    embeddings: np.ndarray | None = None,
    gallery: GalleryLike | None = None,
) -> list[GroundedFace]:
    """Name and place each face.

    Args:
        boxes: (N, 4) x1, y1, x2, y2 per face, in detector order.
        image_width: width of the picture in pixels.
        embeddings: (N, 512) L2-normalised embeddings (needed with a gallery).
        gallery: identities to match against; None leaves every face unknown.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    identities: Sequence[Any] = [None] * len(boxes)
    if gallery is not None and len(boxes):
        if embeddings is None:
            raise ValueError("ground_faces: a gallery needs the faces' embeddings")
        embeddings = np.asarray(embeddings, dtype=np.float32).reshape(len(boxes), -1)
        identities = list(gallery.identify(embeddings))
        if len(identities) != len(boxes):
            raise ValueError(f"gallery.identify returned {len(identities)} results for {len(boxes)} faces")
    faces = []
    for i, (box, ident) in enumerate(zip(boxes, identities)):
        b: Box = (float(box[0]), float(box[1]), float(box[2]), float(box[3]))
        faces.append(
            GroundedFace(
                index=i,
                box=b,
                position=horizontal_position(b, image_width),
                name=None if ident is None else ident.name,
                score=None if ident is None else float(ident.score),
                identity_id=None if ident is None else ident.identity_id,
            )
        )
    return faces


_POSITION_WORDS: dict[str, str] = {"left": "on the left", "centre": "in the centre", "right": "on the right"}


@dataclass(frozen=True)
class GroundingTemplate:
    """Wording of the grounding text; change it per model or language.

    Fields are `str.format` templates. `face_line` gets: number, ref (" <face_i>" or ""), where
    ("on the left" ...), box ("[x1, y1, x2, y2]"), label (name or `unknown`).
    """

    header: str = "A face recognizer found {count} in the picture, listed from left to right:"
    face_line: str = "- face {number}{ref}, {where}, box {box}: {label}."
    no_faces: str = "A face recognizer found no faces in the picture."
    instruction: str = (
        f"Use only these names for these people. Never invent a name: call anyone without a name {UNKNOWN_PERSON}."
    )
    unknown: str = UNKNOWN_PERSON

    def __post_init__(self) -> None:
        for name in ("header", "face_line", "no_faces", "instruction", "unknown"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"GroundingTemplate.{name} must be a string")


def grounding_text(
    faces: Sequence[GroundedFace],
    template: GroundingTemplate | None = None,
    face_refs: bool = False,
    placeholder_token: str = "<face>",
) -> str:
    """The grounding paragraph for `faces` (listed left to right).

    Args:
        faces: grounded faces.
        template: wording; the default English one if None.
        face_refs: add a `<face_i>` reference after each face number (token grounding).
        placeholder_token: the adapter's placeholder, whose stem names the references.
    """
    t = template or GroundingTemplate()
    if not faces:
        return t.no_faces
    stem = placeholder_token[1:-1]
    count = f"{len(faces)} face" + ("s" if len(faces) != 1 else "")
    lines = [t.header.format(count=count)]
    for face in sorted(faces, key=lambda f: ((f.box[0] + f.box[2]) / 2.0, f.index)):
        box = "[" + ", ".join(str(round(v)) for v in face.box) + "]"
        lines.append(
            t.face_line.format(
                number=face.number,
                ref=f" <{stem}_{face.index}>" if face_refs else "",
                where=_POSITION_WORDS[face.position],
                box=box,
                label=face.name if face.name is not None else t.unknown,
            )
        )
    lines.append(t.instruction)
    return "\n".join(lines)


def grounded_messages(
    question: str,
    faces: Sequence[GroundedFace],
    num_images: int = 1,
    template: GroundingTemplate | None = None,
    face_refs: bool = False,
    placeholder_token: str = "<face>",
) -> list[dict[str, Any]]:
    """A one-turn chat: images first, then the grounding paragraph, then the question.

    With `num_images=0` the content is a plain string (what text-only chat templates expect).
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    text = grounding_text(faces, template, face_refs, placeholder_token) + "\n" + question.strip()
    if num_images == 0:
        return [{"role": "user", "content": text}]
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def render_grounded_prompt(
    processor_or_tokenizer: Any,
    question: str,
    faces: Sequence[GroundedFace],
    num_images: int = 1,
    template: GroundingTemplate | None = None,
) -> str:
    """Grounded prompt for any chat model in transformers, through its own chat template.

    Args:
        processor_or_tokenizer: anything with `apply_chat_template` and a chat template (a VLM
            processor, or an LLM tokenizer with `num_images=0`).
        question: the user's request.
        faces: grounded faces.
        num_images: images in the turn (0 for text-only models).
        template: wording.
    """
    if not getattr(processor_or_tokenizer, "chat_template", None):
        raise ValueError(f"{type(processor_or_tokenizer).__name__} has no chat template")
    messages = grounded_messages(question, faces, num_images, template)
    return processor_or_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


__all__ = [
    "GalleryLike",
    "GroundingTemplate",
    "ground_faces",
    "grounded_messages",
    "grounding_text",
    "horizontal_position",
    "render_grounded_prompt",
]
