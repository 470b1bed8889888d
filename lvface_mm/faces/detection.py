"""Face detection behind one small interface.

A detector takes an (H, W, 3) uint8 RGB image and returns `DetectedFace`s: a box, a score and the
five ArcFace landmarks. Backends register a factory under a name, so the pipeline and the CLI pick
them with `create_detector("dlib")` instead of checking names.

Built-in backends:
    dlib        HOG frontal detector + 68-point landmarks reduced to 5 (offline, `[detect]` extra)
    dlib_cnn    dlib's CNN (MMOD) detector, same landmarks: more recall, much slower on CPU
    scrfd       InsightFace SCRFD ONNX models (user-downloaded, onnxruntime)
    retinaface  RetinaFace ONNX models in the common PyTorch layout (user-downloaded, onnxruntime)

Scores are each backend's own confidence (dlib: SVM margin, ONNX models: probability), so a
threshold means something only within one backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class DetectedFace:
    """One detected face in the coordinates of the image it was found in.

    Attributes:
        box: (4,) float32 x1, y1, x2, y2 in pixels (x2/y2 exclusive).
        score: the backend's confidence.
        landmarks: (5, 2) float32 x, y: image-left eye, image-right eye, nose tip, image-left mouth
            corner, image-right mouth corner (the order of the ArcFace template).
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    def __post_init__(self) -> None:
        box = np.asarray(self.box, dtype=np.float32).reshape(-1)
        landmarks = np.asarray(self.landmarks, dtype=np.float32)
        if box.shape != (4,):
            raise ValueError(f"DetectedFace.box must have 4 values (x1, y1, x2, y2), got shape {box.shape}")
        if landmarks.size != 10:
            raise ValueError(f"DetectedFace.landmarks must be (5, 2), got shape {landmarks.shape}")
        if not (np.isfinite(box).all() and np.isfinite(landmarks).all()):
            raise ValueError("DetectedFace box and landmarks must be finite")
        # Frozen dataclass: normalise the arrays once, in place of the caller's objects.
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "landmarks", landmarks.reshape(5, 2))
        object.__setattr__(self, "score", float(self.score))

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def scaled(self, factor: float) -> DetectedFace:
        """The same face with coordinates multiplied by `factor` (maps a downscaled detection back)."""
        return DetectedFace(self.box * factor, self.score, self.landmarks * factor)


@runtime_checkable
class Detector(Protocol):
    """Anything with `detect(image) -> list[DetectedFace]` is a detector."""

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """(H, W, 3) uint8 RGB image -> faces, highest score first."""
        ...


@dataclass(frozen=True)
class DetectorEntry:
    name: str
    factory: Callable[..., Detector]
    description: str
    needs: str = field(default="")  # the extra or file a user must provide, shown by list_detectors


_DETECTORS: dict[str, DetectorEntry] = {}


def register_detector(
    name: str, description: str, needs: str = ""
) -> Callable[[Callable[..., Detector]], Callable[..., Detector]]:
    """Decorator: register a detector class or factory under `name`."""

    def wrap(factory: Callable[..., Detector]) -> Callable[..., Detector]:
        if name in _DETECTORS:
            raise ValueError(f"detector {name!r} is already registered")
        _DETECTORS[name] = DetectorEntry(name, factory, description, needs)
        return factory

    return wrap


def _load_builtins() -> None:
    # The backend modules import their heavy libraries lazily, so importing them only registers names.
    from . import dlib_detector, retinaface, scrfd  # noqa: F401


def list_detectors() -> list[str]:
    """Names accepted by `create_detector`."""
    _load_builtins()
    return sorted(_DETECTORS)


def detector_info(name: str) -> DetectorEntry:
    _load_builtins()
    if name not in _DETECTORS:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(sorted(_DETECTORS))}")
    return _DETECTORS[name]


def create_detector(name: str | Detector, **kwargs: object) -> Detector:
    """Build a registered detector by name (an existing detector object is returned unchanged)."""
    if not isinstance(name, str):
        if isinstance(name, Detector):
            if kwargs:
                raise ValueError("keyword arguments are only accepted with a detector name")
            return name
        raise TypeError(f"detector must be a name or an object with .detect(image), got {type(name).__name__}")
    return detector_info(name).factory(**kwargs)


# -- helpers shared by the backends --------------------------------------------------------------


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate an RGB uint8 image and return it C-contiguous."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"detectors take a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"detectors take an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    return np.ascontiguousarray(image)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression. (N, 4) boxes, (N,) scores -> kept indices, best first."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])  # (R, 2)
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])  # (R, 2)
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def clip_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip x1, y1, x2, y2 to the image; landmarks are left alone (they may be outside)."""
    return np.clip(np.asarray(box, dtype=np.float32), 0, [width, height, width, height]).astype(np.float32)


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Resize keeping the aspect ratio to fit (width, height), pad right and bottom with zeros.

    Returns the (height, width, 3) canvas and the scale applied (canvas px = image px * scale).
    """
    import cv2

    out_w, out_h = size
    h, w = image.shape[:2]
    scale = min(out_w / w, out_h / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=interp)
    return canvas, scale
