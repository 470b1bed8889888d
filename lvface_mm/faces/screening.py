"""Rejecting detections that are not faces: a score floor and a landmark geometry check.

A detector's box alone says little: dlib's HOG detector, for example, reports the round mission
patch on the astronaut's suit in scikit-image's `astronaut.png` with a score of 0.12. Two cheap
screens run after detection:

- a score floor (`min_score`), in the backend's own units (dlib: SVM margin, ONNX models:
  probability); the dlib default lives in `DLIB_DEFAULT_SCORE_THRESHOLD`;
- `LandmarkCheck`: the five landmarks must look like a face seen roughly from the front. In a frame
  that follows the eye line (so rolled heads pass), the eyes must lie above the nose and the nose
  above the mouth, the mouth corners in the same left-right order as the eyes, and the eye distance
  must be a plausible fraction of the box width.

The geometry check catches landmarks that no face produces (upside-down, collapsed or mirrored
points, eyes at a third of a box's size, typical of a regressor run on clutter). It cannot catch
everything: dlib's shape predictor fits a face-shaped set of points to any box, so the patch
above passes it, and the score floor is what rejects it. benchmarks/results/faces.md has the
numbers behind the defaults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .detection import DetectedFace

# dlib HOG scores on the committed portraits, skimage's astronaut/grace_hopper and insightface's t1.jpg group
# photo: real faces 0.33-2.8 at full size (0.85-2.4 for frontal faces downscaled to 40 px); the astronaut's
# mission patch 0.05-0.17 over scales and JPEG qualities. 0.25 sits between the two.
DLIB_DEFAULT_SCORE_THRESHOLD = 0.25


@dataclass(frozen=True)
class LandmarkCheck:
    """Bounds on the five-landmark geometry of a plausible face.

    Distances are in units of the eye distance and measured in the frame of the eye line
    (x along it, y perpendicular, pointing down the face).

    Attributes:
        min_eye_distance, max_eye_distance: eye distance as a fraction of the box width. Frontal faces
            measure 0.33-0.49 with dlib's boxes, turned heads down to 0.25.
        max_roll_degrees: largest tilt of the eye line; beyond it the face is upside down or lying.
        min_nose_drop: the nose must be at least this far below the eye line (measured 0.27-0.95).
        min_mouth_below_nose: the mouth centre must be this far below the nose.
        max_nose_offset: the nose may be this far sideways from the eye midpoint (turned heads: 0.52).
    """

    min_eye_distance: float = 0.15
    max_eye_distance: float = 0.8
    max_roll_degrees: float = 60.0
    min_nose_drop: float = 0.05
    min_mouth_below_nose: float = 0.05
    max_nose_offset: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_eye_distance < self.max_eye_distance:
            raise ValueError(
                f"LandmarkCheck needs 0 <= min_eye_distance < max_eye_distance, got "
                f"{self.min_eye_distance!r} and {self.max_eye_distance!r}"
            )
        if not 0.0 < self.max_roll_degrees <= 180.0:
            raise ValueError(f"LandmarkCheck.max_roll_degrees must be in (0, 180], got {self.max_roll_degrees!r}")
        if not self.max_nose_offset > 0:
            raise ValueError(f"LandmarkCheck.max_nose_offset must be > 0, got {self.max_nose_offset!r}")

    def reason(self, face: DetectedFace) -> str | None:
        """Why `face`'s landmarks are not a plausible face, or None when they are."""
        left_eye, right_eye, nose, left_mouth, right_mouth = face.landmarks.astype(np.float64)
        eye_vec = right_eye - left_eye
        eye_distance = float(np.hypot(*eye_vec))
        width = max(face.width, 1e-6)
        if not self.min_eye_distance <= eye_distance / width <= self.max_eye_distance:
            return (
                f"eye distance {eye_distance / width:.2f} of the box width is outside "
                f"[{self.min_eye_distance}, {self.max_eye_distance}]"
            )
        roll = math.degrees(math.atan2(eye_vec[1], eye_vec[0]))
        if abs(roll) > self.max_roll_degrees:
            return f"eye line tilted {roll:.0f} degrees (limit {self.max_roll_degrees:.0f})"
        along = eye_vec / eye_distance  # unit vector image-left eye -> image-right eye
        down = np.array([-along[1], along[0]])  # perpendicular, towards the chin for an upright face
        mid = (left_eye + right_eye) / 2
        nose_x, nose_y = (nose - mid) @ along / eye_distance, (nose - mid) @ down / eye_distance
        mouth_y = ((left_mouth + right_mouth) / 2 - mid) @ down / eye_distance
        if nose_y < self.min_nose_drop:
            return f"nose {nose_y:.2f} eye distances below the eyes (need {self.min_nose_drop})"
        if mouth_y - nose_y < self.min_mouth_below_nose:
            return f"mouth {mouth_y - nose_y:.2f} eye distances below the nose (need {self.min_mouth_below_nose})"
        if abs(nose_x) > self.max_nose_offset:
            return f"nose {nose_x:.2f} eye distances sideways of the eyes (limit {self.max_nose_offset})"
        if (right_mouth - left_mouth) @ along <= 0:
            return "mouth corners in the opposite left-right order to the eyes"
        return None

    def __call__(self, face: DetectedFace) -> bool:
        return self.reason(face) is None


def screen_faces(
    faces: Sequence[DetectedFace], min_score: float | None = None, landmark_check: LandmarkCheck | None = None
) -> list[DetectedFace]:
    """The faces that reach `min_score` (None: no floor) and pass `landmark_check` (None: no check)."""
    kept = [f for f in faces if min_score is None or f.score >= min_score]
    return [f for f in kept if landmark_check is None or landmark_check(f)]
