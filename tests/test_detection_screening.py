"""Screening detections: the score floor and the landmark geometry check reject the astronaut's mission
patch that dlib reports as a face, keep real faces down to 40 px, and the settings reach the detector
from `FaceEmbedder` and the CLI."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from lvface_mm.cli import build_parser
from lvface_mm.cli.embed import build_embedder
from lvface_mm.faces import (
    DLIB_DEFAULT_SCORE_THRESHOLD,
    DetectedFace,
    FaceEmbedder,
    LandmarkCheck,
    PipelineConfig,
    screen_faces,
)
from lvface_mm.models.pretrained import ARCFACE_TEMPLATE_112
from tests._faces_fixtures import PORTRAITS, needs_dlib, portrait

FACE_BOX = np.array([175, 76, 266, 167], np.float32)  # Eileen Collins in skimage's astronaut.png
PATCH_BOX = np.array([126, 335, 216, 426], np.float32)  # the round mission patch on her suit


def iou(a: np.ndarray, b: np.ndarray) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    return inter / float(np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


def template_face(angle_degrees: float = 0.0, box_scale: float = 1.0) -> DetectedFace:
    """The ArcFace template rotated about the crop centre, in a box of 112 * box_scale px around it."""
    pts = np.asarray(ARCFACE_TEMPLATE_112, np.float32)
    a = math.radians(angle_degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], np.float32)
    pts = (pts - 56) @ rot.T + 56
    half = 56 * box_scale
    return DetectedFace(np.array([56 - half, 56 - half, 56 + half, 56 + half]), 1.0, pts)


# -- the geometry check on known landmark sets ----------------------------------------------------


@pytest.mark.parametrize("angle", [0, 25, -40])
def test_upright_and_rolled_faces_pass(angle):
    assert LandmarkCheck().reason(template_face(angle)) is None


@pytest.mark.parametrize(
    ("face", "why"),
    [
        (template_face(180), "tilted"),  # upside down
        (template_face(90), "tilted"),  # lying on its side
        (template_face(box_scale=4.0), "eye distance 0.08"),  # eyes a twelfth of the box apart
        (template_face(box_scale=0.3), "eye distance 1.05"),  # eyes wider than the box
    ],
)
def test_implausible_geometry_is_named(face, why):
    assert why in LandmarkCheck().reason(face)


def test_swapped_parts_fail():
    pts = np.asarray(ARCFACE_TEMPLATE_112, np.float32)
    box = np.array([0, 0, 112, 112])
    nose_above_eyes = pts.copy()
    nose_above_eyes[2, 1] = 40
    assert "nose" in LandmarkCheck().reason(DetectedFace(box, 1.0, nose_above_eyes))
    mouth_above_nose = pts.copy()
    mouth_above_nose[3:, 1] = 60
    assert "mouth" in LandmarkCheck().reason(DetectedFace(box, 1.0, mouth_above_nose))
    mirrored_mouth = pts[[0, 1, 2, 4, 3]]
    assert "mouth corners" in LandmarkCheck().reason(DetectedFace(box, 1.0, mirrored_mouth))
    nose_off_face = pts.copy()
    nose_off_face[2, 0] = 120
    assert "sideways" in LandmarkCheck().reason(DetectedFace(box, 1.0, nose_off_face))


def test_screen_faces_applies_both_screens_and_settings_validate():
    good, weak, upside_down = template_face(), template_face(5), template_face(180)
    weak = DetectedFace(weak.box, 0.1, weak.landmarks)
    assert screen_faces([good, weak, upside_down]) == [good, weak, upside_down]
    assert screen_faces([good, weak, upside_down], min_score=0.5) == [good, upside_down]
    assert screen_faces([good, weak, upside_down], 0.5, LandmarkCheck()) == [good]
    with pytest.raises(ValueError, match="min_eye_distance"):
        LandmarkCheck(min_eye_distance=0.9, max_eye_distance=0.5)
    with pytest.raises(ValueError, match="min_detection_score"):
        PipelineConfig(min_detection_score=float("nan"))
    with pytest.raises(TypeError, match="landmark_check"):
        PipelineConfig(landmark_check=True)


# -- dlib on real photos ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return data.astronaut()


def embedder(**kwargs) -> FaceEmbedder:
    return FaceEmbedder.from_tiny(backend="torch", **kwargs)


@needs_dlib()
def test_the_mission_patch_is_rejected_by_default_and_found_with_the_old_settings(astronaut):
    faces = embedder().detect(astronaut)
    assert len(faces) == 1 and iou(faces[0].box, FACE_BOX) > 0.8
    # dlib's own floor (0) and no check: the patch comes back, scored well below the default floor.
    old = embedder(min_detection_score=0.0, landmark_check=False).detect(astronaut)
    assert len(old) == 2
    patch = next(f for f in old if iou(f.box, PATCH_BOX) > 0.8)
    assert 0.0 <= patch.score < DLIB_DEFAULT_SCORE_THRESHOLD
    # Its landmarks are face-shaped (dlib's predictor always fits a face): the score floor is what drops it.
    assert LandmarkCheck()(patch)


@needs_dlib()
@pytest.mark.parametrize("name", PORTRAITS)
def test_real_faces_of_40_px_are_kept(name):
    image = portrait(name)
    full = embedder().detect(image)
    assert len(full) == 1
    factor = 40 / full[0].width
    small = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    faces = embedder().detect(small)
    assert len(faces) == 1
    assert 36 <= faces[0].width <= 48
    assert faces[0].score >= DLIB_DEFAULT_SCORE_THRESHOLD and LandmarkCheck()(faces[0])
    np.testing.assert_allclose(faces[0].box / factor, full[0].box, atol=0.25 * full[0].width)


# -- the settings reach the detector ------------------------------------------------------------------


@needs_dlib()
def test_embedder_passes_the_score_floor_to_a_named_detector():
    assert embedder().detector.score_threshold == DLIB_DEFAULT_SCORE_THRESHOLD
    e = embedder(min_detection_score=-0.3, landmark_check=False)
    assert e.detector.score_threshold == -0.3
    assert e.config.min_detection_score == -0.3 and e.config.landmark_check is None
    custom = LandmarkCheck(max_roll_degrees=20)
    assert embedder(landmark_check=custom).config.landmark_check is custom
    with pytest.raises(ValueError, match="disagree"):
        embedder(min_detection_score=0.5, detector_kwargs={"score_threshold": 0.1})


def test_a_detector_object_is_screened_after_detection():
    class Fixed:
        def detect(self, image):
            strong, weak, flipped = template_face(), template_face(10), template_face(180)
            return [strong, DetectedFace(weak.box, 0.2, weak.landmarks), flipped]

    image = np.zeros((112, 112, 3), np.uint8)
    assert len(embedder(detector=Fixed()).detect(image)) == 2  # the upside-down one is dropped
    assert len(embedder(detector=Fixed(), min_detection_score=0.5).detect(image)) == 1
    assert len(embedder(detector=Fixed(), landmark_check=False).detect(image)) == 3


@needs_dlib()
def test_cli_flags_reach_the_detector():
    parser = build_parser()
    args = parser.parse_args(["embed", "a.jpg", "--tiny", "--backend", "torch",
                              "--min-detection-score", "0.6", "--no-landmark-check"])
    e = build_embedder(args)
    assert e.detector.score_threshold == 0.6
    assert e.config.min_detection_score == 0.6 and e.config.landmark_check is None
    default = build_embedder(parser.parse_args(["embed", "a.jpg", "--tiny", "--backend", "torch"]))
    assert default.detector.score_threshold == DLIB_DEFAULT_SCORE_THRESHOLD
    assert default.config.landmark_check == LandmarkCheck()
