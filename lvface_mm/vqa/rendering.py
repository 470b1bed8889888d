"""VQA samples in the one prompt format, with their picture, for one `IdentityVLM`.

Training, `lvface-mm eval vqa` and `IdentityVLM.ask`/`caption`/`stream` all build their prompt with
`lvface_mm.vlm.grounding.family_prompt`: the family's image item, the grounding paragraph (faces
listed with `<face_i>`, position, box in the family's notation, and the gallery's name or "an
unknown person"), then the question, through the model's own chat template. A sample is the faces,
the picture and one question/answer; how the faces are described depends on the mode:

    plain         no grounding paragraph (the picture and the question only)
    prompt        names and boxes in the prompt (no identity tokens)
    som           like prompt, with numbered boxes drawn on the picture (Set-of-Mark)
    token         identity tokens per face; names only through the gallery's candidates when the
                  sample carries references (open-set), else next to each face
    token+prompt  identity tokens and names

VLM samples carry their picture through the family's own processor (a scene image, or for
face-only samples a canvas with the crops pasted at their boxes), so the image-token expansion is
in the ids and -100 in the labels. Text-only LLMs get face-only samples.

Samples whose user turn writes its own `<face>` references (LLaVA-style files) are rendered as
written, with the picture in front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import IGNORE_INDEX, FaceStore
from .schema import Sample, VQAValidationError

MODES = ("plain", "prompt", "som", "token", "token+prompt")
# Processor outputs aligned with input_ids (padded and trimmed with them).
SEQUENCE_KEYS = ("token_type_ids", "mm_token_type_ids")
_BASE_KEYS = ("input_ids", "attention_mask", "labels")
_CANVAS_GREY = 127
_GAP = 16


@dataclass(frozen=True)
class RenderedSample:
    """One sample as model inputs.

    Attributes:
        input_ids: (T,) token ids, image and face placeholders expanded.
        labels: (T,) answer tokens (end of turn included); IGNORE_INDEX elsewhere.
        extras: the processor's other outputs (pixel_values, image_grid_thw, ...), batch dim 1 kept.
        face_order: face index of each placeholder group, in text order.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    extras: dict[str, torch.Tensor]
    face_order: tuple[int, ...]


def writes_own_references(sample: Sample) -> bool:
    """True for LLaVA-style samples whose text already places `<face>` references."""
    return bool(sample.face_order())


def virtual_boxes(sample: Sample) -> tuple[list[tuple[float, float, float, float]], tuple[int, int]]:
    """Face boxes and picture size: the sample's, or faces laid out left to right on a canvas."""
    boxes = [
        f.box if f.box is not None else (_GAP + 128.0 * i, _GAP, 128.0 * (i + 1), 128.0)
        for i, f in enumerate(sample.faces)
    ]
    if sample.image_size is not None:
        return boxes, sample.image_size
    width = int(max([b[2] for b in boxes], default=112.0) + _GAP)
    height = int(max([b[3] for b in boxes], default=112.0) + _GAP)
    return boxes, (width, height)


class SampleRenderer:
    """Renders samples for one `IdentityVLM` in one mode.

    Args:
        vlm: the `IdentityVLM` (family, processor with `<face>`, adapter config).
        root: the dataset directory (image and crop paths are relative to it).
        mode: one of `MODES`.
        template: grounding wording (the API's default if None).
    """

    def __init__(self, vlm: Any, root: str | Path, mode: str = "token", template: Any = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown prompt mode {mode!r}; choose from {list(MODES)}")
        self.vlm, self.root, self.mode, self.template = vlm, Path(root), mode, template

    @property
    def uses_tokens(self) -> bool:
        return self.mode in ("token", "token+prompt")

    # -- pictures --------------------------------------------------------------------------------
    def picture(self, sample: Sample) -> np.ndarray | None:
        """(H, W, 3) uint8: the scene image, or a canvas with the crops at their boxes; None for text-only LLMs."""
        if self.vlm.family.text_only:
            return None
        from PIL import Image

        if sample.images:
            with Image.open(self.root / sample.images[0]) as im:
                return np.array(im.convert("RGB"))
        boxes, (width, height) = virtual_boxes(sample)
        canvas = Image.new("RGB", (width, height), (_CANVAS_GREY,) * 3)
        for face, box in zip(sample.faces, boxes):
            if face.crop is None:
                continue  # an embedding-only face: its box stays grey
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            with Image.open(self.root / face.crop) as im:
                canvas.paste(im.convert("RGB").resize((max(1, x2 - x1), max(1, y2 - y1))), (x1, y1))
        return np.array(canvas)

    # -- prompts ---------------------------------------------------------------------------------
    def grounded_faces(self, sample: Sample, width: float, names: Sequence[str | None] | None = None) -> list[Any]:
        """The sample's faces as the bridge describes them on a picture `width` wide; `names`
        overrides the shown names (a gallery's decisions)."""
        from ..vlm.grounding import horizontal_position
        from ..vlm.results import GroundedFace

        boxes, _ = virtual_boxes(sample)
        chosen = [f.name for f in sample.faces] if names is None else list(names)
        return [
            GroundedFace(index=i, box=tuple(map(float, b)), position=horizontal_position(b, width), name=chosen[i])
            for i, b in enumerate(boxes)
        ]

    def prompt(
        self, sample: Sample, names: Sequence[str | None] | None = None
    ) -> tuple[str, list[list[np.ndarray]] | None, list[dict[str, Any]]]:
        """(prompt text, images for the processor, chat messages) of the sample's question."""
        from ..vlm.grounding import family_messages
        from ..vlm.set_of_mark import draw_marks

        vlm, family = self.vlm, self.vlm.family
        picture = self.picture(sample)
        images = None if picture is None else [[picture]]
        if writes_own_references(sample):
            messages = self._messages_as_written(sample)
            return family.render_prompt(vlm.processor.processor, messages), images, messages
        references = self.references(sample)
        question = sample.turns[-2].text if len(sample.turns) >= 2 else ""
        if len(sample.turns) != 2 or sample.turns[0].role != "user":
            raise ValueError(f"sample {sample.id!r}: a grounded sample is one user question and one answer")
        if self.mode == "plain" or not sample.faces:
            content = family.user_content(question, 0 if picture is None else 1)
            messages = [{"role": "user", "content": content}]
            return family.render_prompt(vlm.processor.processor, messages), images, messages
        size = virtual_boxes(sample)[1] if picture is None else (picture.shape[1], picture.shape[0])
        faces = self.grounded_faces(sample, size[0], names)
        marks = self.mode == "som"
        messages = family_messages(
            family,
            question,
            faces,
            size,
            face_refs=self.uses_tokens,
            placeholder_token=vlm.config.placeholder_token,
            template=self.template,
            marks=marks,
            show_names=self.mode != "token",
            references=references,
        )
        if marks and images is not None:
            images = [[draw_marks(picture, [f.box for f in faces], [f.number for f in faces])]]
        return family.render_prompt(vlm.processor.processor, messages), images, messages

    def _messages_as_written(self, sample: Sample) -> list[dict[str, Any]]:
        family = self.vlm.family
        messages = sample.messages(len(sample.turns) - 1)
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        out = []
        for i, m in enumerate(messages):
            images = 0 if family.text_only or i != first_user else 1
            out.append({"role": m["role"], "content": family.user_content(m["content"], images)})
        return out

    def references(self, sample: Sample) -> list[Any] | None:
        """The gallery candidates a token-mode sample shows (open-set binding); None without any."""
        from ..vlm.grounding import Reference

        if self.mode != "token" or "references" not in sample.meta:
            return None
        refs = sample.meta["references"]
        return [Reference(str(r["name"]), len(sample.faces) + j) for j, r in enumerate(refs)]

    # -- encoding --------------------------------------------------------------------------------
    def region_boxes(self, sample: Sample) -> torch.Tensor | None:
        """(F, 4) the picture faces' person regions as fractions of the processed picture, in the
        token modes of adapters with region features (`lvface_mm.vlm.regions`); None otherwise."""
        vlm = self.vlm
        reader = getattr(vlm.adapter.projector, "region_reader", None)
        if reader is None or vlm.family.text_only or not self.uses_tokens:
            return None
        boxes, size = virtual_boxes(sample)
        if sample.images and sample.image_size is None:
            from PIL import Image

            with Image.open(self.root / sample.images[0]) as im:
                size = im.size
        return vlm.family.region_boxes(boxes, size[0], size[1], vlm.processor.processor)

    def face_count(self, sample: Sample) -> int:
        """Identity-token slots: the picture's faces, then the references' faces."""
        return len(sample.faces) + len(self.references(sample) or ())

    def encode(self, sample: Sample) -> RenderedSample:
        """The training example: prompt + answer, labels on the answer only."""
        vlm, family = self.vlm, self.vlm.family
        prompt, images, messages = self.prompt(sample)
        answer = sample.answer
        full = family.render_answer(vlm.processor.processor, messages, answer)
        n = self.face_count(sample) if self.uses_tokens or writes_own_references(sample) else 0
        prompt_x, order = vlm.processor.expand(prompt, n)
        full_x, full_order = vlm.processor.expand(full, n)
        if full_order != order:
            raise ValueError(f"sample {sample.id!r}: the answer must not refer to faces")
        inputs = family.encode_answer(vlm.processor.processor, prompt_x, full_x, answer, images)
        inputs = family.check_inputs(inputs, vlm.processor.placeholder_id)
        labels = inputs.pop("labels")[0]
        ids = inputs.pop("input_ids")[0]
        inputs.pop("attention_mask", None)
        return RenderedSample(ids, labels, inputs, tuple(order))

    def check(self, samples: Sequence[Sample]) -> None:
        """Every sample renderable? One `VQAValidationError` listing each bad sample (before training)."""
        from PIL import Image

        errors: list[tuple[str, str, str]] = []
        for s in samples:
            for j, path in enumerate(s.images):
                try:
                    with Image.open(self.root / path) as im:
                        im.verify()
                        size = im.size
                except Exception as exc:  # noqa: BLE001 - any decoder failure means "cannot be read"
                    errors.append((s.id, f"images[{j}]", f"cannot read {self.root / path}: {exc}"))
                    continue
                if j == 0:
                    for i, f in enumerate(s.faces):
                        if f.box is not None and not (
                            f.box[0] >= 0 and f.box[1] >= 0 and f.box[2] <= size[0] and f.box[3] <= size[1]
                        ):
                            errors.append(
                                (s.id, f"faces[{i}].box", f"{list(f.box)} falls outside the {size[0]}x{size[1]} image")
                            )
            for i, f in enumerate(s.faces):
                if f.crop is not None and not (self.root / f.crop).is_file():
                    errors.append((s.id, f"faces[{i}].crop", f"file not found: {self.root / f.crop}"))
            if len(s.turns) != 2 and not writes_own_references(s):
                errors.append((s.id, "conversations", "a grounded sample is one user question and one answer"))
        if errors:
            raise VQAValidationError(errors, str(self.root))


class RenderedDataset(Dataset):
    """Fixed-size training items, plus the processor's picture inputs.

    Fixed sizes let the training loop's default collation work across processes: ids and labels
    padded to the longest sample of the set, faces padded to the most faces in a sample
    (`face_mask`), placeholder order padded with -1. The task trims the padding per batch.

    Sequence-aligned extras (`SEQUENCE_KEYS`) are padded with the ids; the rest keep their batch
    dim of 1, so default collation stacks them to (B, 1, ...) and `IdentityAdapterTask` merges the
    first two dims (Qwen's flattened patches become (B * n, D), as its processor batches them).
    Pictures of one dataset must give equal shapes (one scene size per dataset).
    """

    def __init__(self, samples: Sequence[Sample], renderer: SampleRenderer, faces: FaceStore, pad_id: int) -> None:
        if not samples:
            raise ValueError("RenderedDataset needs at least one sample")
        renderer.check(samples)
        self.samples = list(samples)
        self.faces = faces
        self.pad_id = int(pad_id)
        self.renderer = renderer
        self.encoded = [renderer.encode(s) for s in self.samples]
        self.regions = [renderer.region_boxes(s) for s in self.samples]  # once, not per epoch (may read the image)
        self.max_length = max(len(e.input_ids) for e in self.encoded)
        self.max_faces = max(1, max(renderer.face_count(s) for s in self.samples))
        self.max_refs = max(1, max(len(e.face_order) for e in self.encoded))
        shapes = {
            tuple(sorted((k, tuple(v.shape)) for k, v in e.extras.items() if k not in SEQUENCE_KEYS))
            for e in self.encoded
        }
        if len(shapes) > 1:
            raise ValueError(
                f"the samples' picture inputs differ in shape ({len(shapes)} variants); give every scene one size"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        enc, sample = self.encoded[index], self.samples[index]
        T, n = self.max_length, len(enc.input_ids)
        item = {
            "input_ids": torch.full((T,), self.pad_id, dtype=torch.long),  # (T,) right-padded
            "attention_mask": torch.zeros(T, dtype=torch.long),
            "labels": torch.full((T,), IGNORE_INDEX, dtype=torch.long),
        }
        item["input_ids"][:n] = enc.input_ids
        item["attention_mask"][:n] = 1
        item["labels"][:n] = enc.labels
        for key, value in enc.extras.items():
            if key in SEQUENCE_KEYS:
                padded = torch.zeros((1, T), dtype=value.dtype)
                padded[:, :n] = value
                value = padded
            item[key] = value
        feats = identity_inputs(self.renderer, self.faces, sample)  # (F + R, *shape)
        faces = torch.zeros((self.max_faces, *self.faces.feature_shape), dtype=feats.dtype)
        faces[: len(feats)] = feats
        face_mask = torch.zeros(self.max_faces, dtype=torch.bool)
        face_mask[: len(feats)] = True
        order = torch.full((self.max_refs,), -1, dtype=torch.long)
        order[: len(enc.face_order)] = torch.tensor(enc.face_order, dtype=torch.long)
        # The picture's own faces come first in `faces`; the rest are open-set references.
        picture_faces = torch.tensor(min(len(sample.faces), len(feats)), dtype=torch.long)
        item.update(faces=faces, face_mask=face_mask, face_order=order, picture_faces=picture_faces)
        regions = self.regions[index]
        if regions is not None:
            item["face_regions"] = torch.zeros((self.max_faces, 4))  # (F_max, 4) picture faces first
            item["face_regions"][: len(regions)] = regions
        return item


def identity_inputs(renderer: SampleRenderer, faces: FaceStore, sample: Sample) -> torch.Tensor:
    """(F [+ R], *shape): the picture's faces, then the references' faces when the mode shows them."""
    feats = faces.load(sample)
    if renderer.references(sample) is not None:
        feats = torch.cat([feats, faces.load_references(sample).to(feats.dtype)])
    return feats


def model_extras(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Picture inputs of a collated `RenderedDataset` batch, shaped as the processor batches them."""
    skip = {*_BASE_KEYS, "faces", "face_mask", "face_order", "picture_faces", "face_regions"}
    out = {}
    for key, value in batch.items():
        if key in skip:
            continue
        value = value.flatten(0, 1)  # (B, 1, ...) -> (B, ...); Qwen (B, n, D) -> (B * n, D)
        out[key] = value[:, :length] if key in SEQUENCE_KEYS else value
    return out


__all__ = [
    "MODES",
    "RenderedDataset",
    "RenderedSample",
    "SampleRenderer",
    "identity_inputs",
    "model_extras",
    "virtual_boxes",
    "writes_own_references",
]
