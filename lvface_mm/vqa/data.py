"""VQA sample faces -> encoder inputs (`FaceStore`), and the label value the loss ignores.

Token ids, labels and the fixed-size training items are made by `lvface_mm.vqa.rendering`
(`SampleRenderer`, `RenderedDataset`), in the one prompt format the API uses.

Faces come from the dataset's embedding table (cheap: the frozen encoder already ran) or from
pixels: an aligned crop file, or a scene image aligned by landmarks (or cropped by box).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .schema import Face, Sample

IGNORE_INDEX = -100  # labels outside the answer: cross-entropy skips them


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
