"""FaceEmbedder: pictures in, identity embeddings out.

    image -> load (EXIF, modes, size limit) -> detect (boxes + 5 landmarks, on a downscaled copy
    when the image is large) -> align to the 112x112 ArcFace template -> encoder -> L2-normalised
    512-d embedding (+ raw norm, + optional 144 patch tokens)

Crops from many images are batched together. Per-image problems (unreadable file, no face) are
reported in that image's `ImageResult` and never stop the batch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch
from torch import nn

from ..models.inference import auto_uses_bf16, resolve_dtype
from ..models.pretrained import ARCFACE_TEMPLATE_112
from .alignment import align_face, to_model_input
from .detection import DetectedFace, Detector, create_detector
from .encoders import CachedOnnxCropEncoder, OnnxCropEncoder, TorchCropEncoder
from .image_io import DEFAULT_MAX_IMAGE_PIXELS, ImageInput, ImageLoadError, LoadedImage, describe_source, load_image
from .screening import LandmarkCheck, screen_faces

CROP_SIZE = 112


@dataclass(frozen=True)
class PipelineConfig:
    """Knobs of the detect -> align -> embed pipeline.

    Attributes:
        flip_test: add the features of the mirrored crop before normalising (IJB protocol).
        batch_size: crops per encoder call.
        max_faces: keep at most this many faces per image, largest first (None: all).
        min_face_size: drop faces whose box is narrower or shorter than this, in decoded pixels.
        max_image_pixels: decode budget per image (see `image_io`).
        detect_max_side: run the detector on a copy whose longer side is at most this (None: full size);
            boxes and landmarks are mapped back and alignment uses the full-resolution image.
        min_detection_score: drop detections scoring below this, in the detector's own units (None: the
            detector's default floor, e.g. 0.25 for dlib). A named detector is also built with it.
        landmark_check: drop detections whose five landmarks are not a plausible face (None: no check).
    """

    flip_test: bool = False
    batch_size: int = 64
    max_faces: int | None = None
    min_face_size: float = 20.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    detect_max_side: int | None = 1280
    min_detection_score: float | None = None
    landmark_check: LandmarkCheck | None = LandmarkCheck()

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.max_faces is not None and (not isinstance(self.max_faces, int) or self.max_faces < 1):
            raise ValueError(f"max_faces must be None or a positive int, got {self.max_faces!r}")
        if not self.min_face_size >= 0:
            raise ValueError(f"min_face_size must be >= 0, got {self.min_face_size!r}")
        if not isinstance(self.max_image_pixels, int) or self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive int, got {self.max_image_pixels!r}")
        if self.detect_max_side is not None and (
            not isinstance(self.detect_max_side, int) or self.detect_max_side < 32
        ):
            raise ValueError(f"detect_max_side must be None or an int >= 32, got {self.detect_max_side!r}")
        if self.min_detection_score is not None and not math.isfinite(self.min_detection_score):
            raise ValueError(f"min_detection_score must be None or a finite number, got {self.min_detection_score!r}")
        if self.landmark_check is not None and not isinstance(self.landmark_check, LandmarkCheck):
            raise TypeError(f"landmark_check must be a LandmarkCheck or None, got {type(self.landmark_check).__name__}")


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class Face:
    """One embedded face. Coordinates are in pixels of the original image (after EXIF rotation).

    Attributes:
        box: (4,) float32 x1, y1, x2, y2.
        score: detector confidence (NaN for inputs taken as already-aligned crops).
        landmarks: (5, 2) float32, ArcFace order.
        crop: (112, 112, 3) uint8 aligned RGB crop.
        embedding: (512,) float32, L2-normalised.
        norm: L2 norm of the raw feature before normalisation (of the flip-summed feature with flip-test).
        tokens: (144, D) float32 patch tokens when requested, else None.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    crop: np.ndarray
    embedding: np.ndarray
    norm: float
    tokens: np.ndarray | None = None

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class ImageResult:
    """What happened to one input: its faces (largest first), or the error that stopped it."""

    source: str
    faces: list[Face] = field(default_factory=list)
    error: str | None = None
    image_size: tuple[int, int] | None = None  # (width, height) of the original

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def embeddings(self) -> np.ndarray:
        """(num_faces, 512) float32."""
        return np.stack([f.embedding for f in self.faces]) if self.faces else np.zeros((0, 512), np.float32)

    def main_face(self) -> Face:
        """The largest face; raises ValueError naming the source if there is none."""
        if self.error is not None:
            raise ValueError(f"{self.source}: {self.error}")
        if not self.faces:
            raise ValueError(f"{self.source}: no face found")
        return max(self.faces, key=lambda f: f.area)


@dataclass
class _Prepared:
    """An image after load/detect/align, waiting for its crops to be embedded."""

    source: str
    image_size: tuple[int, int] | None
    detections: list[DetectedFace]  # in original-image coordinates
    crops: np.ndarray  # (F, 112, 112, 3) uint8
    error: str | None = None


def _failed(source: str, error: str) -> _Prepared:
    return _Prepared(source, None, [], np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8), error)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cpu_fp32_facevit(encoder: TorchCropEncoder) -> bool:
    """An fp32 FaceViT on the CPU: what `backend="auto"` may run elsewhere than in fp32 PyTorch."""
    from ..models import FaceViT

    return encoder.device.type == "cpu" and encoder.dtype == torch.float32 and isinstance(encoder.model, FaceViT)


def _onnx_is_faster(encoder: TorchCropEncoder) -> bool:
    """True where `backend="auto"` should hand a PyTorch encoder to onnxruntime: an fp32 FaceViT on the CPU."""
    return _cpu_fp32_facevit(encoder) and importlib.util.find_spec("onnxruntime") is not None


def _bf16_is_chosen(encoder: TorchCropEncoder) -> bool:
    """True where `backend="auto"` runs a CPU FaceViT in bf16 PyTorch: the CPU multiplies bf16 natively and
    the measured accuracy decision allows it (`lvface_mm.models.inference.auto_uses_bf16`)."""
    return _cpu_fp32_facevit(encoder) and auto_uses_bf16()


def _cached_onnx_or_torch(
    encoder: TorchCropEncoder, providers: list[str] | None
) -> TorchCropEncoder | CachedOnnxCropEncoder:
    try:
        return CachedOnnxCropEncoder(encoder, providers=providers)
    except (OSError, RuntimeError, ValueError, ImportError) as exc:  # unwritable cache, exporter or runtime failure
        warnings.warn(f"backend='auto': running the encoder in PyTorch; the ONNX export failed ({exc})", stacklevel=3)
        return encoder


class FaceEmbedder:
    """Detect, align and embed faces with an LVFace encoder.

    Args:
        model: a registered model name (`lvface_t/s/b/l`, `lvface_tiny`) or a built nn.Module.
        pretrained: load the official weights for a named model (ignored with `checkpoint_path`).
        checkpoint_path: a local checkpoint for a named model.
        detector: a registered detector name (see `list_detectors()`) or an object with `.detect`.
            Created on first use, so aligned-crop workflows never need the detector's packages.
        detector_kwargs: passed to `create_detector` with a name.
        device: where the PyTorch encoder runs (default: the module's device, else CUDA if available).
        dtype: None (default: fp32, or what `backend="auto"` picks), a torch dtype, or a name from
            `lvface_mm.models.DTYPE_NAMES` ("fp32", "bf16", "fp16", ...), or "auto" (`fastest_dtype`).
        flip_test, batch_size, max_faces, min_face_size, max_image_pixels, detect_max_side: see
            `PipelineConfig`.
        min_detection_score: detections scoring below this are dropped (None: the detector's default,
            0.25 for dlib). With a detector name it is also passed on as `score_threshold`.
        landmark_check: True (default): drop detections whose landmarks are not a plausible face
            (`LandmarkCheck()`); False: keep them; or a `LandmarkCheck` with other bounds.
        backend: "auto" (default): a FaceViT in fp32 on the CPU runs through onnxruntime from a
            cached export of its weights when onnxruntime is installed (faster there; patch tokens
            still come from PyTorch), anything else through PyTorch. On CPUs with native bf16 it
            would run bf16 PyTorch instead if the measured accuracy decision allowed it
            (`lvface_mm.models.inference.auto_uses_bf16`; see docs/encoder.md). "torch": always PyTorch.
            "onnx": onnxruntime on `onnx_path` (for a named model with official weights the
            official .onnx is fetched when no path is given).
        onnx_path, onnx_providers: the ONNX encoder file and onnxruntime providers.
    """

    def __init__(
        self,
        model: str | nn.Module = "lvface_b",
        *,
        pretrained: bool = True,
        checkpoint_path: str | Path | None = None,
        detector: str | Detector = "dlib",
        detector_kwargs: dict[str, object] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        flip_test: bool = False,
        batch_size: int = 64,
        backend: Literal["auto", "torch", "onnx"] = "auto",
        onnx_path: str | Path | None = None,
        onnx_providers: list[str] | None = None,
        max_faces: int | None = None,
        min_face_size: float = 20.0,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        detect_max_side: int | None = 1280,
        min_detection_score: float | None = None,
        landmark_check: bool | LandmarkCheck = True,
    ) -> None:
        if isinstance(landmark_check, bool):
            landmark_check = LandmarkCheck() if landmark_check else None
        self.config = PipelineConfig(
            flip_test, batch_size, max_faces, min_face_size, max_image_pixels, detect_max_side,
            min_detection_score, landmark_check,
        )
        dtype = resolve_dtype(dtype, device if device is not None else _default_device())
        if backend not in ("auto", "torch", "onnx"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'onnx', got {backend!r}")
        if backend == "onnx":
            if dtype not in (None, torch.float32):
                raise ValueError(f"backend='onnx' runs the graph in its own precision; dtype={dtype} is not supported")
            self.encoder: TorchCropEncoder | OnnxCropEncoder | CachedOnnxCropEncoder = OnnxCropEncoder(
                self._onnx_file(model, onnx_path), providers=onnx_providers
            )
        else:
            if isinstance(model, str):
                from ..models import create_model

                model = create_model(
                    model, pretrained=pretrained and checkpoint_path is None, checkpoint_path=checkpoint_path
                )
                device = device if device is not None else _default_device()
            elif not isinstance(model, nn.Module):
                raise TypeError(f"model must be a registered name or an nn.Module, got {type(model).__name__}")
            self.encoder = TorchCropEncoder(model, device, dtype)
            if backend == "auto" and dtype is None and _bf16_is_chosen(self.encoder):
                self.encoder = TorchCropEncoder(self.encoder.model, self.encoder.device, torch.bfloat16)
            elif backend == "auto" and _onnx_is_faster(self.encoder):
                self.encoder = _cached_onnx_or_torch(self.encoder, onnx_providers)
        self._detector_spec = detector
        self._detector_kwargs = dict(detector_kwargs or {})
        if isinstance(detector, str) and min_detection_score is not None:
            given = self._detector_kwargs.setdefault("score_threshold", min_detection_score)
            if given != min_detection_score:
                raise ValueError(
                    f"min_detection_score={min_detection_score} and detector_kwargs score_threshold={given} disagree; "
                    "give one of them"
                )
        self._detector: Detector | None = None
        self.stage_seconds: dict[str, float] = {}
        self.reset_timings()

    @classmethod
    def from_tiny(cls, *, seed: int = 0, **kwargs: object) -> FaceEmbedder:
        """An embedder on `lvface_tiny` with random weights from `seed`: for tests and demos, not for recognition."""
        from ..models import create_model

        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            torch.manual_seed(seed)
            model = create_model("lvface_tiny")
        return cls(model, **kwargs)

    @staticmethod
    def _onnx_file(model: str | nn.Module, onnx_path: str | Path | None) -> Path:
        if onnx_path is not None:
            return Path(onnx_path)
        if not isinstance(model, str):
            raise ValueError("backend='onnx' with a module needs onnx_path= (export it with `lvface-mm export-onnx`)")
        from ..models import fetch_weights, get_model_spec

        spec = get_model_spec(model)
        if spec.weights is None:
            raise ValueError(f"model {spec.name!r} has no official ONNX file; pass onnx_path=")
        return fetch_weights(spec.weights, onnx=True)

    # -- parts -------------------------------------------------------------------------------------
    @property
    def detector(self) -> Detector:
        if self._detector is None:
            self._detector = create_detector(self._detector_spec, **self._detector_kwargs)
        return self._detector

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def reset_timings(self) -> None:
        """Zero the per-stage wall-clock totals in `stage_seconds` (load, detect, align, embed)."""
        self.stage_seconds = {"load": 0.0, "detect": 0.0, "align": 0.0, "embed": 0.0}

    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] += time.perf_counter() - start

    # -- detection and alignment -------------------------------------------------------------------
    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Faces in an (H, W, 3) uint8 RGB image, screened by score and landmark geometry, filtered by size and
        count, largest first."""
        import cv2

        h, w = image.shape[:2]
        limit = self.config.detect_max_side
        factor = limit / max(h, w) if limit is not None and max(h, w) > limit else 1.0
        small = image
        if factor < 1.0:
            small = cv2.resize(
                image, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA
            )
        faces = screen_faces(self.detector.detect(small), self.config.min_detection_score, self.config.landmark_check)
        if factor < 1.0:
            faces = [f.scaled(1.0 / factor) for f in faces]
        faces = [f for f in faces if min(f.width, f.height) >= self.config.min_face_size]
        faces.sort(key=lambda f: -f.area)
        return faces[: self.config.max_faces] if self.config.max_faces else faces

    @staticmethod
    def align(image: np.ndarray, faces: Sequence[DetectedFace]) -> np.ndarray:
        """(F, 112, 112, 3) uint8 crops of `faces` in `image`."""
        if not faces:
            return np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
        return np.stack([align_face(image, f.landmarks, CROP_SIZE) for f in faces])

    def _prepare(self, image: ImageInput, index: int, assume_aligned: bool | None) -> _Prepared:
        source = describe_source(image, index)
        try:
            with self._timed("load"):
                loaded = load_image(image, max_pixels=self.config.max_image_pixels, source=source)
            aligned = assume_aligned if assume_aligned is not None else loaded.array.shape[:2] == (CROP_SIZE, CROP_SIZE)
            if aligned:
                return self._prepare_aligned(loaded)
        except ImageLoadError as exc:
            return _failed(exc.source, exc.reason)
        self.detector  # noqa: B018 - built on first use, outside the per-image guard: setup errors are not per-image
        try:
            with self._timed("detect"):
                faces = self.detect(loaded.array)
            with self._timed("align"):
                crops = self.align(loaded.array, faces)
        except (ValueError, RuntimeError, OSError) as exc:  # a detector or warp failing on this image only
            return _failed(source, f"{type(exc).__name__}: {exc}")
        back = 1.0 / loaded.scale  # decoded pixels -> original pixels
        return _Prepared(source, loaded.original_size, [f.scaled(back) for f in faces], crops)

    def _prepare_aligned(self, loaded: LoadedImage) -> _Prepared:
        import cv2

        h, w = loaded.array.shape[:2]
        if h != w:
            raise ImageLoadError(loaded.source, f"assume_aligned needs a square crop, got {w}x{h}")
        crop = loaded.array
        if h != CROP_SIZE:
            interp = cv2.INTER_AREA if h > CROP_SIZE else cv2.INTER_LINEAR
            crop = cv2.resize(crop, (CROP_SIZE, CROP_SIZE), interpolation=interp)
        ow, oh = loaded.original_size
        template = np.asarray(ARCFACE_TEMPLATE_112, dtype=np.float32) * (ow / CROP_SIZE)
        face = DetectedFace(np.array([0, 0, ow, oh]), math.nan, template)
        return _Prepared(loaded.source, loaded.original_size, [face], crop[None])

    # -- embedding ---------------------------------------------------------------------------------
    def _encode(self, crops: np.ndarray, return_tokens: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, 112, 112, 3) uint8 -> raw (N, 512) float32 features [+ (N, 144, D) tokens], in batches."""
        raws, tokens = [], []
        with self._timed("embed"):
            for start in range(0, len(crops), self.config.batch_size):
                x = to_model_input(crops[start : start + self.config.batch_size], device=self.encoder.device)
                raw, tok = self.encoder(x, flip=self.config.flip_test, return_tokens=return_tokens)
                raws.append(raw)
                if tok is not None:
                    tokens.append(tok)
        if not raws:
            return np.zeros((0, 512), np.float32), None
        return np.concatenate(raws), (np.concatenate(tokens) if return_tokens else None)

    @overload
    def embed_crops(
        self, crops: np.ndarray | Sequence[np.ndarray], *, normalize: bool = ..., return_tokens: Literal[False] = ...
    ) -> np.ndarray: ...
    @overload
    def embed_crops(
        self, crops: np.ndarray | Sequence[np.ndarray], *, normalize: bool = ..., return_tokens: Literal[True]
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def embed_crops(
        self, crops: np.ndarray | Sequence[np.ndarray], *, normalize: bool = True, return_tokens: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Aligned (N, 112, 112, 3) uint8 RGB crops -> (N, 512) float32 embeddings (L2-normalised by default).

        With `return_tokens=True` also returns the (N, 144, D) patch tokens of the original crops.
        """
        array = np.stack(list(crops)) if not isinstance(crops, np.ndarray) else crops
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[1:] != (CROP_SIZE, CROP_SIZE, 3) or array.dtype != np.uint8:
            raise ValueError(
                "embed_crops takes aligned (N, 112, 112, 3) uint8 RGB crops, "
                f"got shape {array.shape} dtype {array.dtype}"
            )
        raw, tokens = self._encode(array, return_tokens)
        out = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12) if normalize else raw
        return (out, tokens) if return_tokens else out

    def _finish(self, batch: list[_Prepared], return_tokens: bool) -> list[ImageResult]:
        crops = [p.crops for p in batch if len(p.crops)]
        all_crops = np.concatenate(crops) if crops else np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
        raw, tokens = self._encode(all_crops, return_tokens)
        norms = np.linalg.norm(raw, axis=1)  # (F,)
        embeddings = raw / np.maximum(norms[:, None], 1e-12)
        results, k = [], 0
        for p in batch:
            faces = []
            for det, crop in zip(p.detections, p.crops):
                faces.append(
                    Face(
                        det.box,
                        det.score,
                        det.landmarks,
                        crop,
                        embeddings[k],
                        float(norms[k]),
                        tokens[k] if tokens is not None else None,
                    )
                )
                k += 1
            results.append(ImageResult(p.source, faces, p.error, p.image_size))
        return results

    def iter_embed(
        self, images: Iterable[ImageInput], *, assume_aligned: bool | None = None, return_tokens: bool = False
    ) -> Iterator[ImageResult]:
        """Yield one `ImageResult` per input, in order, embedding crops of several images per batch.

        Args:
            images: paths, PIL images or arrays.
            assume_aligned: True: inputs are aligned square face crops (resized to 112, no detection);
                False: always detect; None: skip detection exactly for 112x112 inputs.
            return_tokens: also keep each face's (144, D) patch tokens (PyTorch backend).
        """
        if return_tokens and not getattr(self.encoder, "supports_tokens", False):
            raise ValueError("return_tokens needs a FaceViT encoder in PyTorch (backend='auto' or 'torch')")
        pending: list[_Prepared] = []
        num_crops = 0
        for index, image in enumerate(images):
            prepared = self._prepare(image, index, assume_aligned)
            pending.append(prepared)
            num_crops += len(prepared.crops)
            if num_crops >= self.config.batch_size:
                yield from self._finish(pending, return_tokens)
                pending, num_crops = [], 0
        if pending:
            yield from self._finish(pending, return_tokens)

    def embed(
        self, images: Iterable[ImageInput], *, assume_aligned: bool | None = None, return_tokens: bool = False
    ) -> list[ImageResult]:
        """One `ImageResult` per input (see `iter_embed`). A single path or image is also accepted."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)  # (N, H, W, C): a stack of images
        elif isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "getexif"):
            images = [images]  # one image, not an iterable of rows or characters
        return list(self.iter_embed(images, assume_aligned=assume_aligned, return_tokens=return_tokens))

    def embed_image(
        self, image: ImageInput, *, assume_aligned: bool | None = None, return_tokens: bool = False
    ) -> ImageResult:
        """`ImageResult` of one input."""
        return self.embed([image], assume_aligned=assume_aligned, return_tokens=return_tokens)[0]

    __call__ = embed
