"""What the ONNX detectors (SCRFD, RetinaFace) share: an onnxruntime session, letterboxed input,
score threshold + NMS, and loading a user-chosen file from the Hugging Face Hub.

A subclass says how to turn the letterboxed uint8 image into the input tensor (`preprocess`) and
how to read the raw outputs back into boxes, scores and landmarks in canvas pixels (`decode`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..models.pretrained import WeightsNotAvailableError
from .detection import DetectedFace, check_image, clip_box, letterbox, nms

_ONNX_HINT = "pip install 'lvface-mm[onnx]'  (onnxruntime)"


def onnx_session(path: str | Path, providers: list[str] | None = None):
    """An onnxruntime InferenceSession for `path`, with errors that name the file."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError(f"ONNX detectors need onnxruntime: {_ONNX_HINT}") from exc
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model file {path} does not exist")
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ValueError(f"{path} is not a loadable ONNX model: {exc}") from exc


def hub_file(repo_id: str, filename: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Download (or take from the cache) one file of a Hugging Face Hub repo.

    Offline and not cached, raises `WeightsNotAvailableError` saying what to fetch and how to pass
    it directly instead.
    """
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
    except Exception as exc:  # offline, 404, auth: the hub raises many types
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        at = f" at revision {revision}" if revision else ""
        raise WeightsNotAvailableError(
            f"could not get {filename} from the Hugging Face repo {repo_id}{at}"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {exc.__class__.__name__}.\n"
            f"Fetch it on a machine with internet:\n"
            f"  huggingface-cli download {repo_id} {filename}{' --revision ' + revision if revision else ''}\n"
            f"then copy the Hugging Face cache (HF_HOME) here, or pass the file itself: model_path='/path/to/"
            f"{Path(filename).name}'"
        ) from exc


class OnnxFaceDetector:
    """Base class: letterbox -> session -> decode -> threshold -> NMS -> image coordinates.

    Args:
        model_path: the .onnx file.
        input_size: (width, height) fed to the network when the graph's input is dynamic; both
            must be multiples of 32. A graph with a fixed input size always uses its own.
        score_threshold: minimum face probability.
        nms_threshold: IoU above which the weaker of two boxes is dropped.
        providers: onnxruntime execution providers (default: CUDA when available, then CPU).
    """

    def __init__(
        self,
        model_path: str | Path,
        input_size: tuple[int, int] = (640, 640),
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        providers: list[str] | None = None,
    ) -> None:
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if not 0.0 < nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold must be in (0, 1], got {nms_threshold}")
        self.model_path = Path(model_path)
        self.session = onnx_session(model_path, providers)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape  # [N, 3, H, W]; symbolic dims are strings or None
        fixed = len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:])
        self.input_size = (int(shape[3]), int(shape[2])) if fixed else tuple(int(v) for v in input_size)
        if len(self.input_size) != 2 or any(v <= 0 or v % 32 for v in self.input_size):
            raise ValueError(
                f"{self.model_path}: input_size must be two positive multiples of 32, got {self.input_size}"
            )

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        filename: str,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        **kwargs: object,
    ) -> OnnxFaceDetector:
        """Load an ONNX detector file from the Hugging Face Hub (cached after the first download)."""
        return cls(hub_file(repo_id, filename, revision=revision, cache_dir=cache_dir), **kwargs)

    @classmethod
    def create(
        cls,
        model_path: str | Path | None = None,
        *,
        repo_id: str | None = None,
        filename: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        **kwargs: object,
    ) -> OnnxFaceDetector:
        """Registry factory: a local `model_path`, or `repo_id` + `filename` on the Hugging Face Hub."""
        if model_path is not None:
            if repo_id is not None or filename is not None:
                raise ValueError(f"{cls.__name__}: pass either model_path or repo_id + filename, not both")
            return cls(model_path, **kwargs)
        if repo_id is None or filename is None:
            raise ValueError(
                f"{cls.__name__} has no bundled weights: pass model_path='/path/to/model.onnx', or "
                f"repo_id= and filename= of an ONNX file on the Hugging Face Hub"
            )
        return cls.from_pretrained(repo_id, filename, revision=revision, cache_dir=cache_dir, **kwargs)

    # -- subclass hooks -----------------------------------------------------------------------------
    def preprocess(self, canvas: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB canvas -> (1, 3, H, W) float32 network input."""
        raise NotImplementedError

    def decode(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw outputs -> (N,) scores, (N, 4) boxes, (N, 5, 2) landmarks in canvas pixels."""
        raise NotImplementedError

    # -- pipeline -----------------------------------------------------------------------------------
    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        image = check_image(image)
        h, w = image.shape[:2]
        canvas, scale = letterbox(image, self.input_size)
        outputs = self.session.run(None, {self.input_name: self.preprocess(canvas)})
        scores, boxes, landmarks = self.decode([np.asarray(o) for o in outputs])
        keep = scores >= self.score_threshold
        scores, boxes, landmarks = scores[keep], boxes[keep], landmarks[keep]
        faces = []
        for i in nms(boxes, scores, self.nms_threshold):
            box = clip_box(boxes[i] / scale, w, h)
            if box[2] <= box[0] or box[3] <= box[1]:
                continue  # entirely in the padding
            faces.append(DetectedFace(box, float(scores[i]), landmarks[i] / scale))
        return faces


def split_outputs(outputs: list[np.ndarray], widths: dict[int, str]) -> dict[str, list[np.ndarray]]:
    """Group raw outputs by their last dimension (e.g. 1 -> scores, 4 -> boxes, 10 -> landmarks).

    A leading batch axis of 1 is dropped, so (1, N, C) and (N, C) exports both work.
    """
    groups: dict[str, list[np.ndarray]] = {kind: [] for kind in widths.values()}
    for out in outputs:
        if out.ndim == 3 and out.shape[0] == 1:
            out = out[0]
        if out.ndim != 2 or out.shape[1] not in widths:
            shapes = [tuple(o.shape) for o in outputs]
            raise ValueError(
                f"unexpected detector output shape {tuple(out.shape)} (all outputs: {shapes}); expected "
                f"(N, C) or (1, N, C) with C in {sorted(widths)}"
            )
        groups[widths[out.shape[1]]].append(out.astype(np.float32))
    return groups
