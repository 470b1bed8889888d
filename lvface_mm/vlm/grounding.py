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

from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class Reference:
    """A gallery candidate shown to the model in open-set token mode.

    Attributes:
        name: the enrolled name, written next to the reference tokens.
        face_index: index of the reference's identity tokens among the prompt's faces (after the
            picture's own faces), so `<face_{face_index}>` carries them.
    """

    name: str
    face_index: int


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
    ("on the left" ...), box (in the model's box notation), label (name or `unknown`).
    `mark_header`/`mark_line` replace `header`/`face_line` in Set-of-Mark mode, where the picture
    carries numbered boxes and faces are called by their mark.
    """

    header: str = "A face recognizer found {count} in the picture, listed from left to right:"
    face_line: str = "- face {number}{ref}, {where}, box {box}: {label}."
    mark_header: str = "A face recognizer found {count} and drew a numbered box on each, listed from left to right:"
    mark_line: str = "- mark {number}{ref}, {where}, box {box}: {label}."
    no_faces: str = "A face recognizer found no faces in the picture."
    instruction: str = (
        f"Use only these names for these people. Never invent a name: call anyone without a name {UNKNOWN_PERSON}."
    )
    unknown: str = UNKNOWN_PERSON
    # Open-set token mode: faces without names, then the gallery's candidates with reference tokens.
    nameless_line: str = "- face {number}{ref}, {where}, box {box}."
    references_header: str = "People the gallery retrieved, each with an enrolled reference face:"
    # The reference's tokens come before its name: a name's words can then see (causal attention)
    # whether their reference matched a face, so copying the name is the plain induction pattern.
    reference_line: str = "- reference{ref}: {name}"
    no_references: str = "The gallery retrieved nobody."
    reference_instruction: str = (
        f"Name a face only if it matches one of these references; call any other face {UNKNOWN_PERSON}."
    )

    def __post_init__(self) -> None:
        for name in (
            "header",
            "face_line",
            "mark_header",
            "mark_line",
            "no_faces",
            "instruction",
            "unknown",
            "nameless_line",
            "references_header",
            "reference_line",
            "no_references",
            "reference_instruction",
        ):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"GroundingTemplate.{name} must be a string")


def pixel_box(box: Box) -> str:
    """The box in pixels, "[x1, y1, x2, y2]" (when no picture size is known)."""
    return "[" + ", ".join(str(round(v)) for v in box) + "]"


def grounding_text(
    faces: Sequence[GroundedFace],
    template: GroundingTemplate | None = None,
    face_refs: bool = False,
    placeholder_token: str = "<face>",
    box_text: Callable[[Box], str] | None = None,
    marks: bool = False,
    *,
    show_names: bool = True,
    references: Sequence[Reference] | None = None,
) -> str:
    """The grounding paragraph for `faces` (listed left to right).

    Args:
        faces: grounded faces.
        template: wording; the default English one if None.
        face_refs: add a `<face_i>` reference after each face number (token grounding).
        placeholder_token: the adapter's placeholder, whose stem names the references.
        box_text: writes a box in the model's notation (`VLMFamily.format_box` bound to the
            picture size); pixels when None.
        marks: Set-of-Mark wording (the picture carries numbered boxes, see `set_of_mark.py`).
        show_names: write the gallery's decision (name or `unknown`) on each face line. Open-set
            token mode leaves it out and lists `references` instead.
        references: the gallery's candidates, each a name with the face index of its enrolled
            reference tokens (`<face_j>`, j past the picture's faces); needs `face_refs`. None
            (closed-set token mode) writes no candidate block; an empty list says nobody matched.
    """
    t = template or GroundingTemplate()
    if references is not None and not face_refs:
        raise ValueError("grounding_text: references need face_refs=True (they are identity tokens)")
    if not faces:
        return t.no_faces
    stem = placeholder_token[1:-1]
    count = f"{len(faces)} face" + ("s" if len(faces) != 1 else "")
    write_box = box_text or pixel_box
    lines = [(t.mark_header if marks else t.header).format(count=count)]
    line = t.mark_line if marks else t.face_line
    if not show_names:
        line = t.nameless_line.replace("face {number}", "mark {number}") if marks else t.nameless_line
    for face in sorted(faces, key=lambda f: ((f.box[0] + f.box[2]) / 2.0, f.index)):
        box = write_box(face.box)
        lines.append(
            line.format(
                number=face.number,
                ref=f" <{stem}_{face.index}>" if face_refs else "",
                where=_POSITION_WORDS[face.position],
                box=box,
                label=face.name if face.name is not None else t.unknown,
            )
        )
    if show_names:
        lines.append(t.instruction)
    if references is not None:
        lines.append(t.references_header if references else t.no_references)
        for ref in references:
            lines.append(t.reference_line.format(name=ref.name, ref=f" <{stem}_{ref.face_index}>"))
        lines.append(t.reference_instruction)
    return "\n".join(lines)


def grounded_messages(
    question: str,
    faces: Sequence[GroundedFace],
    num_images: int = 1,
    template: GroundingTemplate | None = None,
    face_refs: bool = False,
    placeholder_token: str = "<face>",
    box_text: Callable[[Box], str] | None = None,
    marks: bool = False,
    *,
    show_names: bool = True,
    references: Sequence[Reference] | None = None,
) -> list[dict[str, Any]]:
    """A one-turn chat: images first, then the grounding paragraph, then the question.

    With `num_images=0` the content is a plain string (what text-only chat templates expect).
    `box_text` and `marks` as for `grounding_text`.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    paragraph = grounding_text(
        faces, template, face_refs, placeholder_token, box_text, marks, show_names=show_names, references=references
    )
    text = paragraph + "\n" + question.strip()
    if num_images == 0:
        return [{"role": "user", "content": text}]
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def clip_to_picture(box: Sequence[float], width: float, height: float) -> Box:
    """A detector box clipped to the picture (detectors may overhang the edge by a few pixels)."""
    x1, x2 = (min(max(float(v), 0.0), float(width)) for v in (box[0], box[2]))
    y1, y2 = (min(max(float(v), 0.0), float(height)) for v in (box[1], box[3]))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {list(box)} lies outside the {width:g} x {height:g} picture")
    return (x1, y1, x2, y2)


def family_messages(
    family: Any,
    question: str,
    faces: Sequence[GroundedFace],
    image_size: tuple[float, float],
    *,
    face_refs: bool = False,
    placeholder_token: str = "<face>",
    template: GroundingTemplate | None = None,
    marks: bool = False,
    show_names: bool = True,
    references: Sequence[Reference] | None = None,
) -> list[dict[str, Any]]:
    """The one-turn chat of the one prompt format (see `family_prompt`), before the chat template."""
    width, height = image_size

    def box_text(box: Box) -> str:
        return family.format_box(clip_to_picture(box, width, height), width, height)

    return grounded_messages(
        question,
        faces,
        0 if family.text_only else 1,
        template,
        face_refs,
        placeholder_token,
        box_text,
        marks,
        show_names=show_names,
        references=references,
    )


def family_prompt(
    family: Any,
    processor: Any,
    question: str,
    faces: Sequence[GroundedFace],
    image_size: tuple[float, float],
    **options: Any,
) -> str:
    """The one prompt format: training samples, `eval vqa` and `ask`/`caption`/`stream` all render here.

    One user turn (the family's image item unless text-only, the grounding paragraph with boxes in
    the family's notation, the question), rendered by the model's own chat template.

    Args:
        family: the model's `VLMFamily`.
        processor: its processor (tokenizer for text-only LLMs), holding the chat template.
        question: the request.
        faces: grounded faces (boxes in pixels of the picture).
        image_size: (width, height) of the picture.
        **options: face_refs, placeholder_token, template, marks, show_names, references (see
            `grounding_text`).
    """
    return family.render_prompt(processor, family_messages(family, question, faces, image_size, **options))


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
    "Reference",
    "clip_to_picture",
    "family_messages",
    "family_prompt",
    "ground_faces",
    "grounded_messages",
    "grounding_text",
    "horizontal_position",
    "pixel_box",
    "render_grounded_prompt",
]
