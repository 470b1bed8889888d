"""What the identity bridge returns: faces with names and positions, and answers that point at them.

Every name in an answer is tied back to the face (index and box) it refers to, so a demo can draw
the box and the name together. Plain dataclasses: no tensors, safe to serialise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Position = Literal["left", "centre", "right"]
Box = tuple[float, float, float, float]

UNKNOWN_PERSON = "an unknown person"


@dataclass(frozen=True)
class GroundedFace:
    """One face in the picture as the bridge describes it to the VLM.

    Attributes:
        index: position of the face in the detector's list (0-based); `<face_{index}>` refers to it.
        box: x1, y1, x2, y2 in pixels of the input image.
        position: horizontal third of the picture holding the box centre.
        name: the gallery identity accepted at the calibrated threshold, or None (unknown).
        score: cosine similarity to the best gallery match (None without a gallery).
        identity_id: the gallery's id of `name`, or None.
    """

    index: int
    box: Box
    position: Position
    name: str | None = None
    score: float | None = None
    identity_id: int | None = None

    @property
    def number(self) -> int:
        """1-based number used in prompts ("face 1")."""
        return self.index + 1

    @property
    def label(self) -> str:
        return self.name if self.name is not None else UNKNOWN_PERSON

    @property
    def known(self) -> bool:
        return self.name is not None


@dataclass(frozen=True)
class NameMention:
    """A span of the answer that names a face ("Alice") or points at one ("face 2").

    Attributes:
        text: the matched text.
        start: character offset in the answer.
        end: end offset (exclusive).
        face_indices: the faces it refers to (several when one person appears twice).
        boxes: their boxes, in the same order.
        name: the identity's name, or None when the span points at an unknown face.
    """

    text: str
    start: int
    end: int
    face_indices: tuple[int, ...]
    boxes: tuple[Box, ...]
    name: str | None


@dataclass(frozen=True)
class IdentityAnswer:
    """A caption or answer with the faces it was grounded in.

    Attributes:
        text: the generated text.
        faces: every face found in the picture, with names and positions.
        mentions: the spans of `text` that refer to faces, in text order.
        prompt: the exact prompt given to the model (after the chat template, before expansion).
    """

    text: str
    faces: tuple[GroundedFace, ...]
    mentions: tuple[NameMention, ...]
    prompt: str

    @property
    def names(self) -> list[str]:
        """Distinct names mentioned, in order of first mention."""
        seen: list[str] = []
        for m in self.mentions:
            if m.name is not None and m.name not in seen:
                seen.append(m.name)
        return seen

    def faces_named(self, name: str) -> list[GroundedFace]:
        return [f for f in self.faces if f.name == name]


_FACE_NUMBER_RE = re.compile(r"\b[Ff]ace (\d+)\b")


def find_mentions(text: str, faces: Sequence[GroundedFace]) -> tuple[NameMention, ...]:
    """Spans of `text` naming a known face (whole-word, case-sensitive) or saying "face N"."""
    mentions: list[NameMention] = []
    by_name: dict[str, list[GroundedFace]] = {}
    for face in faces:
        if face.name is not None:
            by_name.setdefault(face.name, []).append(face)
    for name, named in by_name.items():
        for match in re.finditer(rf"(?<!\w){re.escape(name)}(?!\w)", text):
            mentions.append(
                NameMention(
                    match.group(0),
                    match.start(),
                    match.end(),
                    tuple(f.index for f in named),
                    tuple(f.box for f in named),
                    name,
                )
            )
    by_number = {f.number: f for f in faces}
    for match in _FACE_NUMBER_RE.finditer(text):
        face = by_number.get(int(match.group(1)))
        if face is not None:
            mentions.append(
                NameMention(match.group(0), match.start(), match.end(), (face.index,), (face.box,), face.name)
            )
    return tuple(sorted(mentions, key=lambda m: (m.start, m.end)))


__all__ = ["UNKNOWN_PERSON", "Box", "GroundedFace", "IdentityAnswer", "NameMention", "Position", "find_mentions"]
