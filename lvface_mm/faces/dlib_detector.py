"""The default detector: dlib, fully offline on CPU.

Boxes come from dlib's HOG + linear SVM frontal-face detector (compiled into dlib, no model file)
or, optionally, its CNN (MMOD) detector. Landmarks come from the 68-point shape predictor shipped
in the `face_recognition_models` package, reduced to the five ArcFace points the way IJB landmarks
are reduced: the mean of each eye contour (points 36-41 and 42-47), the nose tip (30) and the two
outer mouth corners (48, 54).

Licence note: dlib is Boost-licensed; `face_recognition_models` ships its files as CC0, but the
68-point model was trained on iBUG 300-W, whose images exclude commercial use.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np

from .detection import DetectedFace, check_image, clip_box, register_detector
from .screening import DLIB_DEFAULT_SCORE_THRESHOLD

_INSTALL_HINT = "pip install 'lvface-mm[detect]'  (dlib-bin and face-recognition-models)"

# 68-point indices (iBUG 300-W numbering) for each of the five ArcFace landmarks; eyes are averaged.
_FIVE_FROM_68: tuple[tuple[int, ...], ...] = (
    (36, 37, 38, 39, 40, 41),  # image-left eye (the subject's right eye)
    (42, 43, 44, 45, 46, 47),  # image-right eye
    (30,),  # nose tip
    (48,),  # image-left mouth corner
    (54,),  # image-right mouth corner
)


def _import_dlib():
    try:
        import dlib
    except ImportError as exc:
        raise ImportError(f"the 'dlib' detector needs dlib: {_INSTALL_HINT}") from exc
    return dlib


def face_recognition_models_file(name: str) -> Path:
    """Path of a model file in the installed `face_recognition_models` package.

    The package is located without importing it: its `__init__` imports `pkg_resources`, which
    recent setuptools no longer provides.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the dlib landmarks need the face_recognition_models package: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall face-recognition-models ({_INSTALL_HINT})")
    return path


@functools.lru_cache(maxsize=4)
def _shape_predictor(path: str):
    # Loading the 100 MB 68-point model takes about a second; share one per process.
    return _import_dlib().shape_predictor(path)


@functools.lru_cache(maxsize=2)
def _cnn_detector(path: str):
    return _import_dlib().cnn_face_detection_model_v1(path)


@register_detector("dlib", "dlib HOG frontal detector + 68-point landmarks reduced to 5", needs="[detect] extra")
class DlibDetector:
    """dlib face detector with five ArcFace landmarks.

    Args:
        model: "hog" (fast, frontal faces of about 80 px, 40 px with upsample=1) or "cnn" (MMOD:
            more poses, roughly 100x slower on CPU).
        upsample: how many times dlib doubles the image before scanning (finds smaller faces, costs 4x
            time each).
        score_threshold: minimum detector score (HOG: SVM margin, CNN: confidence). The default, 0.25, is
            above dlib's own 0: it drops clothing patches and badges that HOG scores 0.05-0.17 while
            frontal faces score above 0.8 even at 40 px (see `lvface_mm.faces.screening`).
        landmarks_path: a 68-point `shape_predictor` .dat file; default: the one in face_recognition_models.
    """

    def __init__(
        self,
        model: str = "hog",
        upsample: int = 1,
        score_threshold: float = DLIB_DEFAULT_SCORE_THRESHOLD,
        landmarks_path: str | Path | None = None,
    ) -> None:
        if model not in ("hog", "cnn"):
            raise ValueError(f"DlibDetector model must be 'hog' or 'cnn', got {model!r}")
        if not isinstance(upsample, int) or upsample < 0:
            raise ValueError(f"DlibDetector upsample must be an int >= 0, got {upsample!r}")
        if not isinstance(score_threshold, (int, float)) or not math.isfinite(score_threshold):
            raise ValueError(f"DlibDetector score_threshold must be a finite number, got {score_threshold!r}")
        dlib = _import_dlib()
        self.model = model
        self.upsample = upsample
        self.score_threshold = float(score_threshold)
        path = (
            Path(landmarks_path)
            if landmarks_path
            else face_recognition_models_file("shape_predictor_68_face_landmarks.dat")
        )
        if not path.is_file():
            raise FileNotFoundError(f"landmarks_path {path} does not exist")
        self._predictor = _shape_predictor(str(path))
        if model == "hog":
            self._detector = dlib.get_frontal_face_detector()
        else:
            self._detector = _cnn_detector(str(face_recognition_models_file("mmod_human_face_detector.dat")))

    def _boxes(self, image: np.ndarray) -> list[tuple[object, float]]:
        if self.model == "hog":
            # adjust_threshold lets dlib return weaker boxes; we filter with our own threshold.
            rects, scores, _ = self._detector.run(image, self.upsample, min(self.score_threshold, 0.0))
            return list(zip(rects, scores))
        return [(d.rect, d.confidence) for d in self._detector(image, self.upsample)]

    def landmarks68(self, image: np.ndarray, rect: object) -> np.ndarray:
        """(68, 2) float32 landmarks inside a dlib rectangle."""
        shape = self._predictor(image, rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        image = check_image(image)
        h, w = image.shape[:2]
        faces = []
        for rect, score in self._boxes(image):
            if score < self.score_threshold:
                continue
            pts = self.landmarks68(image, rect)
            five = np.stack([pts[list(idx)].mean(0) for idx in _FIVE_FROM_68])  # (5, 2)
            # dlib rectangles are inclusive on the right/bottom edge.
            box = clip_box(np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1]), w, h)
            faces.append(DetectedFace(box, float(score), five))
        return sorted(faces, key=lambda f: -f.score)


@register_detector("dlib_cnn", "dlib CNN (MMOD) detector + 68-point landmarks; slow on CPU", needs="[detect] extra")
def _dlib_cnn(**kwargs: object) -> DlibDetector:
    return DlibDetector(model="cnn", **kwargs)
