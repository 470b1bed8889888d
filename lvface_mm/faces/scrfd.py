"""SCRFD face detector (Guo et al., "Sample and Computation Redistribution for Efficient Face
Detection", ICLR 2022) from InsightFace's ONNX exports, e.g. `det_10g.onnx` in buffalo_l or
`scrfd_*_bnkps.onnx`. The weights are not bundled: InsightFace releases them for non-commercial
research only; download one yourself and pass its path.

Output layout of those exports: for each stride (8, 16, 32; or 8..128 for five-level models) one
score map (N, 1) after sigmoid, one box-distance map (N, 4) and one keypoint-distance map (N, 10),
where N = (H / stride) * (W / stride) * anchors, rows ordered by location (row-major) then
anchor. Distances are in units of the stride and measured from the anchor centre, which sits at
the top-left corner of its cell (x * stride, y * stride).
"""

from __future__ import annotations

import numpy as np

from .detection import register_detector
from .onnx_detector import OnnxFaceDetector, split_outputs


def scrfd_anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """(height * width * num_anchors, 2) anchor centres x, y in input pixels, location-major."""
    ys, xs = np.mgrid[:height, :width]
    centers = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride  # (h*w, 2)
    return np.repeat(centers, num_anchors, axis=0)


def scrfd_decode_level(
    scores: np.ndarray, box_dist: np.ndarray, kps_dist: np.ndarray, centers: np.ndarray, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One stride's raw maps -> (N,) scores, (N, 4) x1y1x2y2, (N, 5, 2) landmarks in input pixels."""
    d = box_dist * stride  # (N, 4): left, top, right, bottom distances
    boxes = np.concatenate([centers - d[:, :2], centers + d[:, 2:]], axis=1)
    landmarks = centers[:, None, :] + kps_dist.reshape(-1, 5, 2) * stride  # (N, 5, 2)
    return scores.reshape(-1), boxes, landmarks


class SCRFDDetector(OnnxFaceDetector):
    """SCRFD ONNX detector with five landmarks. Input: RGB, (x - 127.5) / 128, letterboxed."""

    mean = 127.5
    std = 128.0

    def preprocess(self, canvas: np.ndarray) -> np.ndarray:
        x = (canvas.astype(np.float32) - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # (1, 3, H, W)

    def decode(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        groups = split_outputs(outputs, {1: "scores", 4: "boxes", 10: "kps"})
        levels = len(groups["scores"])
        if not groups["kps"]:
            raise ValueError(
                f"{self.model_path}: this SCRFD model has no keypoint outputs; alignment needs the five "
                f"landmarks, so use a keypoint model (names ending in _kps/_bnkps, or det_10g.onnx)"
            )
        if levels not in (3, 5) or len(groups["boxes"]) != levels or len(groups["kps"]) != levels:
            raise ValueError(
                f"{self.model_path}: expected 3 or 5 levels of score/box/keypoint outputs, got "
                f"{len(groups['scores'])}/{len(groups['boxes'])}/{len(groups['kps'])}"
            )
        strides = (8, 16, 32, 64, 128)[:levels]
        width, height = self.input_size
        cells = {s: (height // s) * (width // s) for s in strides}
        # Outputs are matched to strides by their row count, which does not depend on their order.
        num_anchors = max(len(o) for o in groups["scores"]) // cells[8]
        by_rows = {cells[s] * num_anchors: s for s in strides}
        all_scores, all_boxes, all_kps = [], [], []
        for kind in ("scores", "boxes", "kps"):
            rows = sorted(len(o) for o in groups[kind])
            if rows != sorted(by_rows):
                raise ValueError(
                    f"{self.model_path}: {kind} outputs have {rows} rows; for input {width}x{height} with "
                    f"{num_anchors} anchors per location expected {sorted(by_rows)}"
                )
        pick = {kind: {by_rows[len(o)]: o for o in groups[kind]} for kind in ("scores", "boxes", "kps")}
        for s in strides:
            centers = scrfd_anchor_centers(height // s, width // s, s, num_anchors)
            sc, bx, kp = scrfd_decode_level(pick["scores"][s], pick["boxes"][s], pick["kps"][s], centers, s)
            all_scores.append(sc)
            all_boxes.append(bx)
            all_kps.append(kp)
        return np.concatenate(all_scores), np.concatenate(all_boxes), np.concatenate(all_kps)


register_detector(
    "scrfd",
    "InsightFace SCRFD ONNX with keypoints (model_path= or repo_id= + filename=)",
    needs="[onnx] extra + a downloaded .onnx",
)(SCRFDDetector.create)
