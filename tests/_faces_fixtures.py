"""Shared helpers for the faces tests: the committed portraits, group composites, and tiny ONNX
graphs whose outputs encode faces at known places."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

PORTRAITS_DIR = Path(__file__).parent / "data" / "portraits"
PORTRAITS = ("obama", "obama2", "obama3", "biden")


def portrait_path(name: str) -> Path:
    return PORTRAITS_DIR / f"{name}.jpg"


def portrait(name: str) -> np.ndarray:
    from PIL import Image

    with Image.open(portrait_path(name)) as im:
        return np.asarray(im.convert("RGB")).copy()


def composite(names: tuple[str, ...], height: int = 400, gap: int = 20) -> np.ndarray:
    """Portraits resized to one height and pasted side by side on grey: a group photo with len(names) faces."""
    from PIL import Image

    panels = []
    for name in names:
        with Image.open(portrait_path(name)) as im:
            im = im.convert("RGB")
            panels.append(im.resize((round(im.width * height / im.height), height), Image.BILINEAR))
    width = sum(p.width for p in panels) + gap * (len(panels) + 1)
    canvas = Image.new("RGB", (width, height + 2 * gap), (128, 128, 128))
    x = gap
    for p in panels:
        canvas.paste(p, (x, gap))
        x += p.width + gap
    return np.asarray(canvas).copy()


def panel_spans(names: tuple[str, ...], height: int = 400, gap: int = 20) -> list[tuple[int, int]]:
    """x ranges of the panels made by `composite`."""
    from PIL import Image

    spans, x = [], gap
    for name in names:
        with Image.open(portrait_path(name)) as im:
            w = round(im.width * height / im.height)
        spans.append((x, x + w))
        x += w + gap
    return spans


def needs_dlib() -> pytest.MarkDecorator:
    missing = importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None
    return pytest.mark.skipif(missing, reason="the [detect] extra (dlib-bin, face-recognition-models) is not installed")


def needs_onnx() -> pytest.MarkDecorator:
    missing = importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None
    return pytest.mark.skipif(missing, reason="the [onnx] extra (onnx, onnxruntime) is not installed")


def constant_onnx(
    path: Path,
    outputs: list[tuple[str, np.ndarray]],
    input_shape: list[int | str],
    input_name: str = "input.1",
) -> Path:
    """An ONNX model with one image input whose outputs are the given constants (the input is ignored)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, infos = [], []
    for name, value in outputs:
        value = np.asarray(value, dtype=np.float32)
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_value")))
        infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(
        nodes, "faces_test", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)], infos
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class CachedDetector:
    """A real detector that remembers its answer per picture: the tests detect the same photos many
    times, and the answer for identical pixels cannot change."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.cache: dict[tuple, list] = {}
        self.calls = 0

    def detect(self, image: np.ndarray) -> list:
        import hashlib

        key = (image.shape, hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest())
        if key not in self.cache:
            self.calls += 1
            self.cache[key] = self.inner.detect(image)
        return list(self.cache[key])


_SHARED: dict[str, CachedDetector] = {}


def shared_dlib() -> CachedDetector:
    """One cached dlib detector per test session."""
    if "dlib" not in _SHARED:
        from lvface_mm.faces import create_detector

        _SHARED["dlib"] = CachedDetector(create_detector("dlib"))
    return _SHARED["dlib"]
