"""VQA samples -> model inputs: token ids with loss only on assistant turns, plus the faces.

`ConversationEncoder` renders a sample with the model's own chat template and tokenises it turn
by turn, so every token of an assistant answer (including the template's end-of-turn marker) is a
label and everything else (system, user turns, template scaffolding) is -100. Each face reference
becomes K placeholder tokens, exactly as `IdentityProcessor` expands prompts at inference.

`VQADataset` returns fixed-size tensors so the training loop's default collation works across
processes: ids and labels padded to the longest sample of the set, faces padded to the most faces
in a sample (`face_mask`), placeholder order padded with -1. The task trims the padding per batch.

Faces come from the dataset's embedding table (cheap: the frozen encoder already ran) or from
pixels: an aligned crop file, or a scene image aligned by landmarks (or cropped by box).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from .schema import FACE_TOKEN, Face, Sample

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedSample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant answers
    face_order: list[int]  # face index of each placeholder group, in text order


class ConversationEncoder:
    """Tokenises samples for one model: its chat template, its placeholder and K.

    Args:
        tokenizer: the model's tokenizer (with the placeholder token already added).
        placeholder_token: e.g. "<face>".
        num_id_tokens: K, placeholder tokens per face reference.
        content: how a message's text is written for the chat template: a plain string (text-only
            LLMs) or a list of typed parts (VLM templates); see `VLMFamily.user_content`.
        max_length: longest encoded sample allowed; longer ones raise (never silently truncated,
            since cutting an answer would train on half a name).
    """

    def __init__(
        self,
        tokenizer: Any,
        placeholder_token: str = FACE_TOKEN,
        num_id_tokens: int = 1,
        content: Literal["string", "parts"] = "string",
        max_length: int = 2048,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template")
        self.tokenizer = tokenizer
        self.placeholder_token = placeholder_token
        self.num_id_tokens = num_id_tokens
        self.content = content
        self.max_length = max_length
        self.end_of_turn_ids = self._end_of_turn_ids()

    # -- rendering -------------------------------------------------------------------------------
    def _message(self, role: str, text: str) -> dict[str, Any]:
        body: Any = text if self.content == "string" else [{"type": "text", "text": text}]
        return {"role": role, "content": body}

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        msgs = [self._message(m["role"], m["content"]) for m in messages]
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _end_of_turn_ids(self) -> list[int]:
        """Token ids that close an assistant turn in this template (generation stops there too)."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        prompt = self.render(probe[:1], add_generation_prompt=True)
        full = self.render(probe, add_generation_prompt=False)
        tail = full[len(prompt) :].split("ok", 1)[-1].strip()
        ids = self.tokenizer.encode(tail, add_special_tokens=False) if tail else []
        stops = {int(ids[0])} if ids else set()
        if self.tokenizer.eos_token_id is not None:
            stops.add(int(self.tokenizer.eos_token_id))
        return sorted(stops)

    def _tokens(self, text: str, first: bool) -> list[int]:
        expanded = text.replace(FACE_TOKEN, self.placeholder_token * self.num_id_tokens)
        # Like the causal-LM family at inference: the tokenizer's own specials (BOS) go on the first
        # piece only, and not when the template already wrote BOS.
        bos = self.tokenizer.bos_token
        special = first and not (bos and text.startswith(bos))
        return [int(i) for i in self.tokenizer.encode(expanded, add_special_tokens=special)]

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, sample: Sample) -> EncodedSample:
        """All turns; labels on every assistant turn."""
        messages = sample.messages()
        ids: list[int] = []
        labels: list[int] = []
        done = ""  # rendered text already tokenised
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:j], add_generation_prompt=True)
            full = self.render(messages[: j + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError(
                    f"sample {sample.id!r}: the chat template does not render turns incrementally, so answer "
                    "tokens cannot be located; use a template whose output for n turns extends that for n - 1"
                )
            context = self._tokens(prompt[len(done) :], first=not ids)
            answer = self._tokens(full[len(prompt) :], first=False)
            ids += context + answer
            labels += [IGNORE_INDEX] * len(context) + answer
            done = full
        self._check_length(sample, ids)
        return EncodedSample(ids, labels, sample.face_order())

    def encode_prompt(self, sample: Sample) -> EncodedSample:
        """Every turn but the final answer, ending with the generation prompt (for evaluation)."""
        prompt = self.render(sample.messages(len(sample.turns) - 1), add_generation_prompt=True)
        ids = self._tokens(prompt, first=True)
        self._check_length(sample, ids)
        return EncodedSample(ids, [IGNORE_INDEX] * len(ids), sample.prompt_face_order())

    def _check_length(self, sample: Sample, ids: list[int]) -> None:
        if len(ids) > self.max_length:
            raise ValueError(f"sample {sample.id!r} is {len(ids)} tokens, more than max_length={self.max_length}")


def encoder_for_vlm(vlm: Any, max_length: int = 2048) -> ConversationEncoder:
    """The `ConversationEncoder` matching an `IdentityVLM`: its template, placeholder and K."""
    content: Literal["string", "parts"] = "string" if vlm.family.text_only else "parts"
    config = vlm.config
    return ConversationEncoder(
        vlm.processor.tokenizer, config.placeholder_token, config.num_id_tokens, content=content, max_length=max_length
    )


# -- faces --------------------------------------------------------------------------------------


class FaceStore:
    """Turns a sample's faces into encoder inputs.

    Args:
        root: the dataset directory (paths in samples are relative to it).
        mode: "embedding" -> (F, D) rows of the embedding table; "crop" -> (F, 3, 112, 112)
            normalised crops (from `crop` files, or scene images via landmarks or box).
        embeddings: the (N, D) table, required for mode "embedding".
    """

    def __init__(
        self, root: str | Path, mode: Literal["embedding", "crop"], embeddings: torch.Tensor | None = None
    ) -> None:
        if mode == "embedding" and embeddings is None:
            raise ValueError("FaceStore mode 'embedding' needs the embedding table (embeddings.safetensors)")
        self.root = Path(root)
        self.mode = mode
        self.embeddings = embeddings

    @classmethod
    def open(cls, root: str | Path, mode: Literal["embedding", "crop"]) -> FaceStore:
        table = None
        path = Path(root) / "embeddings.safetensors"
        if mode == "embedding":
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: this dataset has no embeddings; use face_input: crop")
            from safetensors.torch import load_file

            table = load_file(str(path))["embeddings"].float()
        return cls(root, mode, table)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (int(self.embeddings.shape[1]),) if self.mode == "embedding" else (3, 112, 112)

    def load(self, sample: Sample) -> torch.Tensor:
        """(F, *feature_shape) for the sample's faces."""
        if not sample.faces:
            return torch.zeros((0, *self.feature_shape))
        if self.mode == "embedding":
            rows = []
            for i, face in enumerate(sample.faces):
                if face.embedding is None:
                    raise ValueError(
                        f"sample {sample.id!r}, faces[{i}]: no `embedding` row but face_input is embedding"
                    )
                if face.embedding >= len(self.embeddings):
                    raise ValueError(
                        f"sample {sample.id!r}, faces[{i}].embedding: row {face.embedding} out of range "
                        f"({len(self.embeddings)} rows)"
                    )
                rows.append(face.embedding)
            return self.embeddings[rows]
        from ..faces.alignment import to_model_input

        return to_model_input(np.stack([self._crop(sample, i, f) for i, f in enumerate(sample.faces)]))

    def load_references(self, sample: Sample) -> torch.Tensor:
        """(R, *feature_shape) for the enrolled references of an open-set sample (`meta.references`)."""
        refs = sample.meta.get("references") or []
        if not refs:
            return torch.zeros((0, *self.feature_shape))
        if self.mode == "embedding":
            rows = []
            for j, ref in enumerate(refs):
                row = ref.get("embedding")
                if not isinstance(row, int) or not 0 <= row < len(self.embeddings):
                    raise ValueError(f"sample {sample.id!r}, meta.references[{j}].embedding: bad row {row!r}")
                rows.append(row)
            return self.embeddings[rows]
        from PIL import Image

        from ..faces.alignment import to_model_input

        crops = []
        for j, ref in enumerate(refs):
            if not ref.get("crop"):
                raise ValueError(f"sample {sample.id!r}, meta.references[{j}]: no crop but face_input is crop")
            with Image.open(self.root / ref["crop"]) as im:
                crops.append(np.asarray(im.convert("RGB").resize((112, 112))))
        return to_model_input(np.stack(crops))

    def _crop(self, sample: Sample, i: int, face: Face) -> np.ndarray:
        from PIL import Image

        if face.crop is not None:
            with Image.open(self.root / face.crop) as im:
                crop = np.asarray(im.convert("RGB").resize((112, 112)))
            return crop
        if face.image is None:
            raise ValueError(f"sample {sample.id!r}, faces[{i}]: no crop or image to take pixels from")
        path = sample.images[face.image] if isinstance(face.image, int) else face.image
        with Image.open(self.root / path) as im:
            image = np.asarray(im.convert("RGB"))
        if face.landmarks is not None:
            from ..faces.alignment import align_face

            return align_face(image, np.asarray(face.landmarks))
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)  # type: ignore[union-attr]
        with Image.fromarray(image[max(0, y1) : y2, max(0, x1) : x2]) as im:
            return np.asarray(im.resize((112, 112)))


# -- dataset ------------------------------------------------------------------------------------


class VQADataset(Dataset):
    """Fixed-size training items (see the module docstring). Encodes every sample up front."""

    def __init__(self, samples: Sequence[Sample], encoder: ConversationEncoder, faces: FaceStore, pad_id: int) -> None:
        if not samples:
            raise ValueError("VQADataset needs at least one sample")
        self.samples = list(samples)
        self.faces = faces
        self.pad_id = int(pad_id)
        self.encoded = [encoder.encode(s) for s in self.samples]
        self.max_length = max(len(e.input_ids) for e in self.encoded)
        self.max_faces = max(1, max(len(s.faces) for s in self.samples))
        self.max_refs = max(1, max(len(e.face_order) for e in self.encoded))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        enc, sample = self.encoded[index], self.samples[index]
        T, n = self.max_length, len(enc.input_ids)
        input_ids = torch.full((T,), self.pad_id, dtype=torch.long)
        labels = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(T, dtype=torch.long)
        input_ids[:n] = torch.tensor(enc.input_ids)
        labels[:n] = torch.tensor(enc.labels)
        attention_mask[:n] = 1
        feats = self.faces.load(sample)  # (F, *shape)
        faces = torch.zeros((self.max_faces, *self.faces.feature_shape), dtype=feats.dtype)
        faces[: len(feats)] = feats
        face_mask = torch.zeros(self.max_faces, dtype=torch.bool)
        face_mask[: len(feats)] = True
        order = torch.full((self.max_refs,), -1, dtype=torch.long)
        order[: len(enc.face_order)] = torch.tensor(enc.face_order, dtype=torch.long)
        return {
            "input_ids": input_ids,  # (T,) right-padded
            "attention_mask": attention_mask,  # (T,)
            "labels": labels,  # (T,)
            "faces": faces,  # (F_max, *shape)
            "face_mask": face_mask,  # (F_max,)
            "face_order": order,  # (P_max,), -1 = padding
        }
