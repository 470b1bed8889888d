"""Everything the demo does, without the UI: enrol from photos, name the faces in a picture, ask
a VLM about it, index and search a photo collection. ``demos/app.py`` only wires widgets to this.

Parts load lazily and independently, so one missing set of weights disables one feature with a
message saying exactly what to fetch, instead of stopping the whole app:

    face encoder (LVFace)  -> enrol, name faces, search by face/name   (needed by everything)
    CLIP (open_clip)       -> index photos, text search
    VLM (transformers)     -> caption and ask

``WorkbenchConfig(tiny=True)`` uses random tiny models for all three, fully offline.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..models.pretrained import WeightsNotAvailableError
from .photos import IndexReport, PhotoHit, PhotoIndex
from .store import Gallery

__all__ = ["DEFAULT_VLM", "Answer", "EnrolOutcome", "LabelledFace", "PartUnavailable", "Workbench", "WorkbenchConfig"]

# Small enough to answer on a laptop CPU (256 M parameters, about 1 GB in fp32).
DEFAULT_VLM = "HuggingFaceTB/SmolVLM-256M-Instruct"
TINY_VLM = "smolvlm"  # tiny random build of the same family (lvface_mm.vlm.testing)


class PartUnavailable(RuntimeError):
    """A part (face encoder, CLIP, VLM) cannot load; the message says what to fetch or install."""


@dataclass(frozen=True)
class WorkbenchConfig:
    """What the demo runs on.

    Attributes:
        db: SQLite file for the gallery and the photo index (":memory:" is not allowed: two
            connections must share it).
        face_model: LVFace variant (``lvface_t/s/b/l``); ignored with ``tiny``.
        face_checkpoint: local LVFace checkpoint instead of the official weights.
        vlm: adapter-card name, hub id or local folder of the VLM; None disables caption/ask.
        adapter: trained identity adapter folder; with it the VLM uses identity tokens.
        clip_model, clip_pretrained: open_clip architecture and weights (tag or local file).
        tiny: random tiny models everywhere (development, tests).
        detector: face detector name (see ``lvface_mm.faces.list_detectors``).
        max_image_pixels: uploads larger than this are refused before decoding.
        max_new_tokens: answer length limit.
    """

    db: str = "lvface-demo.db"
    face_model: str = "lvface_b"
    face_checkpoint: str | None = None
    vlm: str | None = DEFAULT_VLM
    adapter: str | None = None
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "laion2b_s34b_b79k"
    tiny: bool = False
    detector: str = "dlib"
    max_image_pixels: int = 25_000_000
    max_new_tokens: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        if self.db == ":memory:" or not self.db:
            raise ValueError("WorkbenchConfig.db must be a file path (the gallery and photo index share it)")
        if self.max_image_pixels < 1:
            raise ValueError(f"WorkbenchConfig.max_image_pixels={self.max_image_pixels!r}: expected a positive integer")
        if self.max_new_tokens < 1:
            raise ValueError(f"WorkbenchConfig.max_new_tokens={self.max_new_tokens!r}: expected a positive integer")

    @property
    def face_model_name(self) -> str:
        return "lvface_tiny" if self.tiny else self.face_model


@dataclass(frozen=True)
class LabelledFace:
    index: int  # 1-based, in the order shown (left to right)
    box: tuple[int, int, int, int]
    name: str | None
    score: float

    @property
    def label(self) -> str:
        who = self.name if self.name is not None else "unknown"
        return f"{self.index}: {who} ({self.score:.2f})"


@dataclass(frozen=True)
class EnrolOutcome:
    name: str
    identity_id: int | None
    used: list[str] = field(default_factory=list)  # sources whose face was enrolled
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)


@dataclass(frozen=True)
class Answer:
    text: str
    faces: list[LabelledFace]
    mode: str  # "prompt grounding" or "identity tokens"


class Workbench:
    """The demo's logic; thread-safe for a queue of concurrent users."""

    def __init__(self, config: WorkbenchConfig) -> None:
        self.config = config
        self._lock = threading.RLock()
        self._embedder: Any = None
        self._clip: Any = None
        self._vlm: Any = None
        self._errors: dict[str, str] = {}
        self.gallery = Gallery(config.db, model_name=config.face_model_name)
        self._photos: PhotoIndex | None = None

    # ---------------------------------------------------------------- parts
    @property
    def embedder(self) -> Any:
        with self._lock:
            if self._embedder is None:
                self._embedder = self._load("face encoder", self._make_embedder)
            return self._embedder

    def _make_embedder(self) -> Any:
        from ..faces.embedder import FaceEmbedder

        common = {"detector": self.config.detector, "max_image_pixels": self.config.max_image_pixels}
        if self.config.tiny:
            return FaceEmbedder.from_tiny(seed=self.config.seed, **common)
        return FaceEmbedder(self.config.face_model, checkpoint_path=self.config.face_checkpoint, **common)

    @property
    def clip(self) -> Any:
        with self._lock:
            if self._clip is None:
                self._clip = self._load("CLIP", self._make_clip)
            return self._clip

    def _make_clip(self) -> Any:
        from .clip import ClipConfig, ClipEncoder

        if self.config.tiny:
            return ClipEncoder.tiny(seed=self.config.seed)
        return ClipEncoder.from_pretrained(ClipConfig(self.config.clip_model, self.config.clip_pretrained))

    @property
    def vlm(self) -> Any:
        with self._lock:
            if self.config.vlm is None and not self.config.tiny:
                raise PartUnavailable("no VLM configured: start the demo with --vlm NAME to caption and ask")
            if self._vlm is None:
                self._vlm = self._load("VLM", self._make_vlm)
            return self._vlm

    def _make_vlm(self) -> Any:
        from ..vlm import IdentityVLM

        if self.config.tiny:
            from ..vlm.testing import tiny_identity_vlm  # --tiny: the program chose test models

            return tiny_identity_vlm(TINY_VLM, adapter=self.config.adapter)
        try:
            cfg = self.config
            return IdentityVLM.from_pretrained(cfg.vlm, encoder=cfg.face_model, adapter=cfg.adapter,
                                               encoder_checkpoint=cfg.face_checkpoint)
        except OSError as exc:  # transformers' "not cached and cannot connect" is an OSError
            raise WeightsNotAvailableError(
                f"VLM {self.config.vlm!r} could not be loaded ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
                f"On a machine with internet run `hf download {self.config.vlm}` and copy the Hugging Face cache "
                f"(HF_HOME) here, or pass --vlm /path/to/a/local/copy") from exc

    def _load(self, part: str, make: Any) -> Any:
        if part in self._errors:
            raise PartUnavailable(self._errors[part])
        try:
            return make()
        except (WeightsNotAvailableError, ImportError, OSError, ValueError) as exc:  # missing, junk or wrong file
            self._errors[part] = f"{part} unavailable: {exc}"
            raise PartUnavailable(self._errors[part]) from exc

    @property
    def photos(self) -> PhotoIndex:
        with self._lock:
            if self._photos is None:
                clip = self.clip
                self._photos = PhotoIndex(self.config.db, embedder=self.embedder, clip=clip,
                                          face_model=self.config.face_model_name)
            return self._photos

    def status(self) -> list[str]:
        """One line per part: loaded, not loaded yet, or why it cannot load."""
        lines = [f"face encoder {self.config.face_model_name}: "
                 + ("loaded" if self._embedder else self._errors.get("face encoder", "loads on first use"))]
        lines.append("CLIP: " + ("loaded" if self._clip else self._errors.get("CLIP", "loads on first use")))
        if self.config.vlm is None and not self.config.tiny:
            lines.append("VLM: disabled (--vlm none)")
        else:
            vlm = TINY_VLM + " (tiny, random)" if self.config.tiny else self.config.vlm
            lines.append(f"VLM {vlm}: " + ("loaded" if self._vlm else self._errors.get("VLM", "loads on first use")))
        lines.append(f"gallery: {len(self.gallery)} people, threshold {self.gallery.threshold:.2f}")
        return lines

    # ---------------------------------------------------------------- faces
    def label_faces(self, image: Any) -> tuple[np.ndarray, list[LabelledFace], list[Any]]:
        """(RGB array, labelled faces left to right, the embedder's faces in the same order)."""
        from ..faces.image_io import load_image

        loaded = load_image(image, max_pixels=self.config.max_image_pixels)
        result = self.embedder.embed_image(loaded.array, assume_aligned=False)
        if result.error is not None:
            raise ValueError(f"{loaded.source}: {result.error}")
        faces = sorted(result.faces, key=lambda f: float(f.box[0]))
        found = self.gallery.identify(np.stack([f.embedding for f in faces])) if faces else []
        labelled = [LabelledFace(i + 1, tuple(int(round(float(v))) for v in f.box), o.name, o.score)
                    for i, (f, o) in enumerate(zip(faces, found))]
        return loaded.array, labelled, faces

    def enrol(self, name: str, images: Sequence[Any], metadata: dict[str, Any] | None = None) -> EnrolOutcome:
        """Enrol ``name`` from the largest face of each image; images without a usable face are
        skipped and reported. Quality weights are the raw feature norms (a face-quality proxy)."""
        from ..faces.image_io import ImageLoadError, describe_source, load_image

        if not images:
            raise ValueError("enrol: give at least one photo")
        embeddings, qualities, used, skipped = [], [], [], []
        for i, image in enumerate(images):
            source = os.path.basename(describe_source(image, i))
            try:
                loaded = load_image(image, max_pixels=self.config.max_image_pixels)
                face = self.embedder.embed_image(loaded.array, assume_aligned=False).main_face()
            except (ImageLoadError, ValueError) as exc:
                skipped.append((source, str(exc).removeprefix(f"{describe_source(image, i)}: ")))
                continue
            embeddings.append(face.embedding)
            qualities.append(max(float(face.norm), 1e-6))
            used.append(source)
        if not embeddings:
            return EnrolOutcome(name, None, used, skipped)
        identity_id = self.gallery.enrol(name, np.stack(embeddings), quality=qualities, metadata=metadata)
        return EnrolOutcome(name, identity_id, used, skipped)

    # ---------------------------------------------------------------- VLM
    def ask_stream(self, image: Any, question: str | None) -> Iterator[tuple[str, Answer | None]]:
        """Yield (text so far, None) while generating, then (full text, Answer). An empty question
        asks for a caption. Prompt grounding unless an adapter is loaded (identity tokens)."""
        array, labelled, faces = self.label_faces(image)
        vlm = self.vlm
        from ..vlm.model import CAPTION_REQUEST

        prompt = (question or "").strip() or CAPTION_REQUEST
        use_tokens = self.config.adapter is not None
        stream = vlm.stream(array, prompt, self.gallery, faces=faces, identity_tokens=use_tokens,
                            max_new_tokens=self.config.max_new_tokens)
        text = ""
        for piece in stream:
            text += piece
            yield text, None
        answer = stream.answer(timeout=600)
        mode = "identity tokens" if use_tokens else "prompt grounding"
        yield answer.text, Answer(answer.text, labelled, mode)

    # ---------------------------------------------------------------- photo collection
    def index_photos(self, paths: Sequence[str | Path], progress: Any = None) -> IndexReport:
        return self.photos.add(paths, progress=progress)

    def search(self, query: str = "", face_image: Any = None, k: int = 24) -> list[PhotoHit]:
        """By face photo when given (the query text is then ignored), else by text with names."""
        if face_image is not None:
            return self.photos.search_by_face(face_image, k, gallery=self.gallery,
                                              min_score=self.gallery.threshold)
        if not query.strip():
            raise ValueError("type a query (a name, a description, or both) or give a face photo")
        return self.photos.search(query, self.gallery, k)

    def thumbnail(self, hit: PhotoHit, size: int = 256) -> np.ndarray:
        """A small RGB copy of a result photo with its faces boxed (served from memory, never from disk)."""
        import cv2

        from ..faces.image_io import load_image

        loaded = load_image(hit.path, max_pixels=self.config.max_image_pixels)
        image = loaded.array
        scale = size / max(image.shape[:2])
        if scale < 1:
            image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                               interpolation=cv2.INTER_AREA)
        else:
            image, scale = image.copy(), 1.0
        to_thumb = scale * loaded.scale  # original pixels -> thumbnail pixels
        for face in hit.faces:
            x1, y1, x2, y2 = (int(round(v * to_thumb)) for v in face.box)
            colour = (40, 200, 80) if face.name else (230, 160, 40)
            cv2.rectangle(image, (x1, y1), (x2, y2), colour, 2)
        return image

    def close(self) -> None:
        if self._photos is not None:
            self._photos.close()
        self.gallery.close()
