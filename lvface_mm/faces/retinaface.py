"""RetinaFace (Deng et al., "RetinaFace: Single-stage Dense Face Localisation in the Wild", CVPR
2020) from ONNX exports of the widely used PyTorch re-implementation (MobileNet-0.25 / ResNet-50
backbones). Weights are not bundled; download an export yourself and pass its path.

Output layout of those exports: `loc` (N, 4), `conf` (N, 2: background, face) and `landms`
(N, 10) over a fixed list of priors. Priors are made per stride (8, 16, 32) with two square sizes
per location ((16, 32), (64, 128), (256, 512) px), centred in their cell, rows ordered by location
(row-major) then size, and stored as normalised (cx, cy, w, h). Decoding is the SSD one with
variances (0.1, 0.2): centre = prior_c + loc_xy * 0.1 * prior_wh, size = prior_wh *
exp(loc_wh * 0.2), landmark = prior_c + landm * 0.1 * prior_wh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .detection import register_detector
from .onnx_detector import OnnxFaceDetector, split_outputs


@dataclass(frozen=True)
class RetinaFaceConfig:
    """Prior layout and input convention of a RetinaFace export."""

    steps: tuple[int, ...] = (8, 16, 32)
    min_sizes: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
    variances: tuple[float, float] = (0.1, 0.2)
    mean: tuple[float, float, float] = (104.0, 117.0, 123.0)  # subtracted per channel, in `channel_order`
    channel_order: str = "BGR"  # the PyTorch re-implementation reads images with OpenCV

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.min_sizes) or not self.steps:
            raise ValueError(f"RetinaFaceConfig: one min_sizes entry per step, got {self.steps} and {self.min_sizes}")
        if any(s <= 0 for s in self.steps) or any(m <= 0 for sizes in self.min_sizes for m in sizes):
            raise ValueError("RetinaFaceConfig: steps and min_sizes must be positive")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"RetinaFaceConfig.channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if len(self.variances) != 2 or min(self.variances) <= 0:
            raise ValueError(f"RetinaFaceConfig.variances must be two positive numbers, got {self.variances}")


def retinaface_priors(height: int, width: int, config: RetinaFaceConfig = RetinaFaceConfig()) -> np.ndarray:
    """(N, 4) priors cx, cy, w, h normalised by the input size, location-major then size."""
    levels = []
    for step, sizes in zip(config.steps, config.min_sizes):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        ys, xs = np.mgrid[:fh, :fw]
        cx = ((xs.reshape(-1) + 0.5) * step / width)[:, None].repeat(len(sizes), 1)  # (fh*fw, S)
        cy = ((ys.reshape(-1) + 0.5) * step / height)[:, None].repeat(len(sizes), 1)
        w = np.broadcast_to(np.asarray(sizes, dtype=np.float64) / width, cx.shape)
        h = np.broadcast_to(np.asarray(sizes, dtype=np.float64) / height, cx.shape)
        levels.append(np.stack([cx, cy, w, h], axis=-1).reshape(-1, 4))
    return np.concatenate(levels).astype(np.float32)


def retinaface_decode(
    loc: np.ndarray, landms: np.ndarray, priors: np.ndarray, variances: tuple[float, float], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) loc, (N, 10) landms over (N, 4) priors -> (N, 4) x1y1x2y2, (N, 5, 2) in pixels of `size` (w, h)."""
    scale = np.asarray(size, dtype=np.float32)  # (2,) width, height
    centre = priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:]
    wh = priors[:, 2:] * np.exp(loc[:, 2:] * variances[1])
    boxes = np.concatenate([centre - wh / 2, centre + wh / 2], axis=1) * np.tile(scale, 2)
    points = priors[:, None, :2] + landms.reshape(-1, 5, 2) * variances[0] * priors[:, None, 2:]  # (N, 5, 2)
    return boxes, points * scale


class RetinaFaceDetector(OnnxFaceDetector):
    """RetinaFace ONNX detector. `config` describes the prior layout and input convention."""

    def __init__(self, model_path: str | Path, *, config: RetinaFaceConfig | None = None, **kwargs: object) -> None:
        self.config = config or RetinaFaceConfig()
        super().__init__(model_path, **kwargs)
        width, height = self.input_size
        self._priors = retinaface_priors(height, width, self.config)

    def preprocess(self, canvas: np.ndarray) -> np.ndarray:
        x = canvas[..., ::-1] if self.config.channel_order == "BGR" else canvas
        x = x.astype(np.float32) - np.asarray(self.config.mean, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # (1, 3, H, W)

    def decode(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        groups = split_outputs(outputs, {4: "loc", 2: "conf", 10: "landms"})
        if any(len(groups[k]) != 1 for k in ("loc", "conf", "landms")):
            raise ValueError(
                f"{self.model_path}: expected one loc (N, 4), one conf (N, 2) and one landms (N, 10) output, got "
                f"{[tuple(o.shape) for o in outputs]}"
            )
        loc, conf, landms = groups["loc"][0], groups["conf"][0], groups["landms"][0]
        n = len(self._priors)
        if not len(loc) == len(conf) == len(landms) == n:
            raise ValueError(
                f"{self.model_path}: outputs have {len(loc)}/{len(conf)}/{len(landms)} rows, but the priors for "
                f"input {self.input_size[0]}x{self.input_size[1]} number {n}; check RetinaFaceConfig or input_size"
            )
        # Exports in eval mode already apply softmax; raw logits are recognised and normalised here.
        if not np.allclose(conf.sum(1), 1.0, atol=1e-3) or conf.min() < 0:
            conf = np.exp(conf - conf.max(1, keepdims=True))
            conf = conf / conf.sum(1, keepdims=True)
        boxes, points = retinaface_decode(loc, landms, self._priors, self.config.variances, self.input_size)
        return conf[:, 1], boxes, points


register_detector(
    "retinaface",
    "RetinaFace ONNX, PyTorch-port layout (model_path= or repo_id= + filename=)",
    needs="[onnx] extra + a downloaded .onnx",
)(RetinaFaceDetector.create)
