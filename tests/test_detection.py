"""Detectors: the dlib default on real photos, the SCRFD / RetinaFace ONNX decoders on tiny graphs
whose outputs encode known faces, NMS, letterboxing and the registry."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from lvface_mm.faces import (
    DetectedFace,
    RetinaFaceConfig,
    RetinaFaceDetector,
    SCRFDDetector,
    create_detector,
    detector_info,
    list_detectors,
    nms,
)
from lvface_mm.faces.detection import letterbox
from lvface_mm.models import WeightsNotAvailableError
from tests._faces_fixtures import (
    PORTRAITS,
    composite,
    constant_onnx,
    needs_dlib,
    needs_onnx,
    panel_spans,
    portrait,
)


def check_plausible(face: DetectedFace) -> None:
    """The five points sit inside the box in face order: eyes above nose above mouth, left before right."""
    x1, y1, x2, y2 = face.box
    pts = face.landmarks
    assert ((pts[:, 0] > x1) & (pts[:, 0] < x2) & (pts[:, 1] > y1) & (pts[:, 1] < y2)).all(), (face.box, pts)
    left_eye, right_eye, nose, left_mouth, right_mouth = pts
    assert left_eye[0] < nose[0] < right_eye[0]
    assert left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    eye_distance = np.linalg.norm(right_eye - left_eye)
    assert 0.2 * face.width < eye_distance < 0.7 * face.width


# -- dlib on real photos -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dlib_detector():
    if importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("the [detect] extra is not installed")
    return create_detector("dlib")


@needs_dlib()
@pytest.mark.parametrize("name", PORTRAITS)
def test_dlib_finds_exactly_one_face_per_portrait(dlib_detector, name):
    image = portrait(name)
    faces = dlib_detector.detect(image)
    assert len(faces) == 1
    face = faces[0]
    assert face.score > 0
    assert face.box.dtype == np.float32 and face.landmarks.shape == (5, 2)
    assert 0 <= face.box[0] < face.box[2] <= image.shape[1] and 0 <= face.box[1] < face.box[3] <= image.shape[0]
    check_plausible(face)


@needs_dlib()
@pytest.mark.parametrize("names", [("obama", "biden"), ("obama", "obama2", "obama3", "biden")], ids=["2", "4"])
def test_dlib_finds_every_face_in_a_group(dlib_detector, names):
    faces = dlib_detector.detect(composite(names))
    assert len(faces) == len(names)
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    # One face per pasted portrait.
    spans = panel_spans(names)
    owners = sorted(next(i for i, (a, b) in enumerate(spans) if a <= (f.box[0] + f.box[2]) / 2 < b) for f in faces)
    assert owners == list(range(len(names)))
    for face in faces:
        check_plausible(face)


@needs_dlib()
def test_dlib_five_points_are_the_68_point_reduction(dlib_detector):
    import dlib

    image = portrait("obama")
    face = dlib_detector.detect(image)[0]
    x1, y1, x2, y2 = face.box.astype(int)
    pts68 = dlib_detector.landmarks68(image, dlib.rectangle(x1, y1, x2 - 1, y2 - 1))
    expected = np.stack([pts68[36:42].mean(0), pts68[42:48].mean(0), pts68[30], pts68[48], pts68[54]])
    np.testing.assert_allclose(face.landmarks, expected, atol=1e-4)


@needs_dlib()
def test_dlib_on_bundled_sample_faces(dlib_detector):
    from PIL import Image

    found = 0
    for package, rel, known_box in [
        ("skimage", "data/astronaut.png", (181, 62, 268, 172)),  # Eileen Collins (NASA, public domain)
        ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", None),
    ]:
        spec = importlib.util.find_spec(package)
        if spec is None:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        image = np.asarray(Image.open(path).convert("RGB"))
        faces = dlib_detector.detect(image)
        assert faces, path
        best = faces[0]
        check_plausible(best)
        if known_box is not None:  # the best box overlaps the face found by another detector (MTCNN)
            assert iou(best.box, np.array(known_box, np.float32)) > 0.5
        found += 1
    if not found:
        pytest.skip("neither skimage nor matplotlib is installed")


@needs_dlib()
def test_dlib_finds_nothing_in_a_blank_or_tiny_image(dlib_detector):
    assert dlib_detector.detect(np.full((300, 400, 3), 127, np.uint8)) == []
    assert dlib_detector.detect(np.zeros((1, 1, 3), np.uint8)) == []


@needs_dlib()
def test_dlib_rejects_wrong_input(dlib_detector):
    with pytest.raises(ValueError, match="uint8 RGB"):
        dlib_detector.detect(np.zeros((50, 50), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        dlib_detector.detect(np.zeros((50, 50, 3), np.float32))


def test_missing_detect_extra_gives_install_hint(monkeypatch):
    from lvface_mm.faces import DlibDetector

    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` raise ImportError
    with pytest.raises(ImportError, match=r"lvface-mm\[detect\]"):
        DlibDetector()


def test_missing_landmark_models_give_install_hint(monkeypatch):
    from lvface_mm.faces import dlib_detector

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "face_recognition_models" else real(name, *a)
    )
    with pytest.raises(ImportError, match="face_recognition_models"):
        dlib_detector.face_recognition_models_file("shape_predictor_68_face_landmarks.dat")


@pytest.mark.slow
def test_dlib_cnn_finds_the_face():
    faces = create_detector("dlib_cnn", upsample=0).detect(portrait("obama"))
    assert len(faces) == 1
    check_plausible(faces[0])


# -- helpers ---------------------------------------------------------------------------------------


def iou(a: np.ndarray, b: np.ndarray) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    return float(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter))


def test_nms_keeps_best_of_overlapping_and_all_separate():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5], [21, 20, 31, 30]], np.float32
    )
    scores = np.array([0.8, 0.9, 0.5, 0.3, 0.6])
    # 1 beats 0 and 3 (IoU 0.68, 0.72), 4 beats 2 (IoU 0.82)
    assert nms(boxes, scores, 0.4).tolist() == [1, 4]
    assert nms(boxes, scores, 0.99).tolist() == [1, 0, 4, 2, 3]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.4).tolist() == []


def test_letterbox_keeps_aspect_and_pads_bottom_right():
    image = np.full((100, 200, 3), 255, np.uint8)
    canvas, scale = letterbox(image, (64, 64))
    assert canvas.shape == (64, 64, 3) and scale == pytest.approx(0.32)
    assert (canvas[:32] == 255).all() and (canvas[32:] == 0).all()


def test_detected_face_validates_and_scales():
    face = DetectedFace([10, 20, 30, 60], 0.9, np.arange(10).reshape(5, 2))
    assert face.width == 20 and face.height == 40 and face.area == 800
    doubled = face.scaled(2.0)
    np.testing.assert_array_equal(doubled.box, [20, 40, 60, 120])
    np.testing.assert_array_equal(doubled.landmarks, np.arange(10).reshape(5, 2) * 2)
    with pytest.raises(ValueError, match="box"):
        DetectedFace([1, 2, 3], 0.5, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="landmarks"):
        DetectedFace([1, 2, 3, 4], 0.5, np.zeros((4, 2)))


# -- registry -----------------------------------------------------------------------------------------


def test_registry_lists_builtins_and_rejects_unknown_names():
    assert {"dlib", "dlib_cnn", "scrfd", "retinaface"} <= set(list_detectors())
    assert "onnx" in detector_info("scrfd").needs
    with pytest.raises(ValueError, match="available: .*dlib"):
        create_detector("mtcnn")


def test_create_detector_passes_objects_through():
    class Fixed:
        def detect(self, image):
            return []

    obj = Fixed()
    assert create_detector(obj) is obj
    with pytest.raises(TypeError, match="detect"):
        create_detector(42)


@needs_onnx()
def test_onnx_detectors_need_weights_and_say_how(tmp_path):
    with pytest.raises(ValueError, match="model_path"):
        create_detector("scrfd")
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        create_detector("retinaface", model_path=tmp_path / "nope.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.onnx"):
        create_detector("scrfd", model_path=garbage)


def test_onnx_detector_from_hub_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotAvailableError, match=r"someone/face-detectors.*det_10g\.onnx|det_10g\.onnx.*someone"):
        SCRFDDetector.from_pretrained("someone/face-detectors", "det_10g.onnx", cache_dir=tmp_path)
    with pytest.raises(WeightsNotAvailableError, match="model_path="):
        create_detector("retinaface", repo_id="someone/face-detectors", filename="retina.onnx", cache_dir=tmp_path)


# -- SCRFD decoding -------------------------------------------------------------------------------------

# Image 256 wide, 192 high, letterboxed into a 128x128 input at scale 0.5 (content 128x96, padding below).
IMAGE_W, IMAGE_H, SCALE = 256, 192, 0.5
ROWS = {8: 16 * 16 * 2, 16: 8 * 8 * 2, 32: 4 * 4 * 2}  # 2 anchors per location


def scrfd_maps(with_kps: bool = True) -> dict[str, np.ndarray]:
    scores = {s: np.full((n, 1), 0.01, np.float32) for s, n in ROWS.items()}
    boxes = {s: np.zeros((n, 4), np.float32) for s, n in ROWS.items()}
    kps = {s: np.zeros((n, 10), np.float32) for s, n in ROWS.items()}
    # Face A: stride 8, cell x=5 y=4, anchor 1 -> row (4*16+5)*2+1; anchor centre (40, 32).
    row = (4 * 16 + 5) * 2 + 1
    scores[8][row] = 0.9
    boxes[8][row] = [2, 3, 2.5, 3.5]  # canvas box (24, 8, 60, 60)
    points_a = np.array([[32, 20], [50, 20], [41, 30], [34, 44], [48, 44]], np.float32)
    kps[8][row] = ((points_a - [40, 32]) / 8).reshape(-1)
    # A weaker duplicate of A on anchor 0 of the same cell: NMS removes it.
    scores[8][row - 1] = 0.7
    boxes[8][row - 1] = [2.2, 3, 2.5, 3.5]
    # Face B: stride 32, cell x=2 y=1, anchor 0 -> row 12; centre (64, 32); overlaps A a little (IoU 0.16).
    scores[32][12] = 0.8
    boxes[32][12] = [0.5, 0.5, 0.75, 0.75]  # canvas box (48, 16, 88, 56)
    points_b = np.array([[58, 28], [76, 28], [67, 36], [60, 46], [74, 46]], np.float32)
    kps[32][12] = ((points_b - [64, 32]) / 32).reshape(-1)
    # Below the score threshold: dropped.
    scores[16][50] = 0.3
    boxes[16][50] = [1, 1, 1, 1]
    # Confident but entirely in the letterbox padding (canvas y 104..120 > 96): dropped.
    row_pad = (7 * 8 + 2) * 2
    scores[16][row_pad] = 0.95
    boxes[16][row_pad] = [1, 0.5, 1, 0.5]
    # Outputs in a scrambled order, some with a batch axis, as exporters produce them.
    out = {
        "score_8": scores[8][None], "bbox_16": boxes[16], "score_32": scores[32], "bbox_8": boxes[8][None],
        "score_16": scores[16], "bbox_32": boxes[32][None],
    }
    if with_kps:
        out = {"kps_32": kps[32], **out, "kps_8": kps[8][None], "kps_16": kps[16]}
    return out, points_a, points_b


@needs_onnx()
def test_scrfd_decodes_known_faces(tmp_path):
    maps, points_a, points_b = scrfd_maps()
    path = constant_onnx(tmp_path / "scrfd.onnx", list(maps.items()), [1, 3, 128, 128])
    detector = create_detector("scrfd", model_path=path)
    assert detector.input_size == (128, 128)  # read from the graph
    faces = detector.detect(np.zeros((IMAGE_H, IMAGE_W, 3), np.uint8))
    assert [round(f.score, 3) for f in faces] == [0.9, 0.8]
    np.testing.assert_allclose(faces[0].box, np.array([24, 8, 60, 60]) / SCALE, atol=1e-3)
    np.testing.assert_allclose(faces[0].landmarks, points_a / SCALE, atol=1e-3)
    np.testing.assert_allclose(faces[1].box, np.array([48, 16, 88, 56]) / SCALE, atol=1e-3)
    np.testing.assert_allclose(faces[1].landmarks, points_b / SCALE, atol=1e-3)
    # A stricter threshold keeps only A; a looser NMS keeps A's duplicate too.
    assert len(SCRFDDetector(path, score_threshold=0.85).detect(np.zeros((IMAGE_H, IMAGE_W, 3), np.uint8))) == 1
    assert len(SCRFDDetector(path, nms_threshold=0.99).detect(np.zeros((IMAGE_H, IMAGE_W, 3), np.uint8))) == 3


@needs_onnx()
def test_scrfd_without_keypoints_is_refused_clearly(tmp_path):
    maps, *_ = scrfd_maps(with_kps=False)
    path = constant_onnx(tmp_path / "scrfd_nokps.onnx", list(maps.items()), [1, 3, 128, 128])
    with pytest.raises(ValueError, match="keypoint"):
        SCRFDDetector(path).detect(np.zeros((64, 64, 3), np.uint8))


@needs_onnx()
def test_scrfd_wrong_input_size_is_reported(tmp_path):
    maps, *_ = scrfd_maps()
    path = constant_onnx(tmp_path / "scrfd_dyn.onnx", list(maps.items()), ["N", 3, "H", "W"])
    with pytest.raises(ValueError, match="rows"):
        SCRFDDetector(path, input_size=(160, 128)).detect(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="multiples of 32"):
        SCRFDDetector(path, input_size=(100, 100))


def test_scrfd_preprocess_is_rgb_centred_at_127_5():
    canvas = np.zeros((32, 32, 3), np.uint8)
    canvas[0, 0] = (255, 127, 0)
    x = SCRFDDetector.preprocess(SCRFDDetector.__new__(SCRFDDetector), canvas)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [127.5 / 128, -0.5 / 128, -127.5 / 128])


# -- RetinaFace decoding --------------------------------------------------------------------------------

NUM_PRIORS = 16 * 16 * 2 + 8 * 8 * 2 + 4 * 4 * 2  # steps 8/16/32, two sizes per location, 128x128 input


def retinaface_maps(logits: bool) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    loc = np.zeros((NUM_PRIORS, 4), np.float32)
    landms = np.zeros((NUM_PRIORS, 10), np.float32)
    conf = np.tile(np.array([[3.0, 0.0]] if logits else [[0.98, 0.02]], np.float32), (NUM_PRIORS, 1))
    # Prior at step 16, row 3, column 2, first size (64 px): index 512 + (3*8+2)*2.
    # Its centre is ((2+0.5)*16, (3+0.5)*16) = (40, 56) px and its size 64 px, i.e. (0.3125, 0.4375, 0.5, 0.5).
    i = 512 + (3 * 8 + 2) * 2
    conf[i] = [0.0, 3.0] if logits else [0.1, 0.9]
    loc[i] = [0.4, -0.2, np.log(0.9) / 0.2, np.log(1.1) / 0.2]
    # centre (0.3125 + 0.4*0.1*0.5, 0.4375 - 0.2*0.1*0.5) = (0.3325, 0.4275); size (0.45, 0.55)
    box = np.array([0.3325 - 0.225, 0.4275 - 0.275, 0.3325 + 0.225, 0.4275 + 0.275]) * 128
    points = np.array([[30, 40], [52, 41], [41, 55], [33, 70], [50, 70]], np.float32)
    landms[i] = ((points / 128 - [0.3125, 0.4375]) / (0.1 * 0.5)).reshape(-1)
    return {"conf": conf[None], "landms": landms[None], "loc": loc[None]}, box, points


@needs_onnx()
@pytest.mark.parametrize("logits", [False, True], ids=["softmax", "logits"])
def test_retinaface_decodes_a_known_face(tmp_path, logits):
    maps, box, points = retinaface_maps(logits)
    path = constant_onnx(tmp_path / "retina.onnx", list(maps.items()), ["N", 3, "H", "W"], input_name="input0")
    detector = create_detector("retinaface", model_path=path, input_size=(128, 128))
    faces = detector.detect(np.zeros((128, 128, 3), np.uint8))
    assert len(faces) == 1
    expected = 0.9 if not logits else np.exp(3) / (1 + np.exp(3))
    assert faces[0].score == pytest.approx(expected, abs=1e-5)
    np.testing.assert_allclose(faces[0].box, box, atol=1e-3)
    np.testing.assert_allclose(faces[0].landmarks, points, atol=1e-3)


@needs_onnx()
def test_retinaface_prior_count_mismatch_is_explained(tmp_path):
    maps, *_ = retinaface_maps(False)
    path = constant_onnx(tmp_path / "retina.onnx", list(maps.items()), ["N", 3, "H", "W"])
    with pytest.raises(ValueError, match="priors"):
        RetinaFaceDetector(path, input_size=(160, 160)).detect(np.zeros((64, 64, 3), np.uint8))


def test_retinaface_preprocess_is_bgr_minus_mean():
    canvas = np.zeros((32, 32, 3), np.uint8)
    canvas[0, 0] = (10, 20, 30)  # R, G, B
    det = RetinaFaceDetector.__new__(RetinaFaceDetector)
    det.config = RetinaFaceConfig()
    x = det.preprocess(canvas)
    np.testing.assert_allclose(x[0, :, 0, 0], [30 - 104, 20 - 117, 10 - 123])
    with pytest.raises(ValueError, match="channel_order"):
        RetinaFaceConfig(channel_order="YUV")
