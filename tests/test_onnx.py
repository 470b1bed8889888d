"""ONNX export in the official layout and the onnxruntime encoder: parity with PyTorch, dynamic
batch, official-style graphs (numbered output, other input names), clear errors, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lvface_mm.models import create_model  # noqa: E402
from lvface_mm.models.onnx import OnnxEncoder, export_onnx  # noqa: E402
from tests._encoder_fixtures import official_state_dict  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    model = create_model("lvface_tiny")
    model.load_state_dict(official_state_dict(32, 2, seed=11))  # non-trivial BN statistics
    return model.train()  # export must switch to eval itself


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    return export_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def _torch_embed(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    was_training = model.training
    with torch.inference_mode():
        out = model.eval()(torch.from_numpy(x)).numpy()
    model.train(was_training)
    return out


def test_graph_follows_the_official_converter(exported: Path, tiny_model) -> None:
    graph = onnx.load(str(exported)).graph
    assert [i.name for i in graph.input] == ["data"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch_size" and [d.dim_value for d in dims[1:]] == [3, 112, 112]
    assert len(graph.output) == 1
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param == "batch_size" and out_dims[1].dim_value == 512
    assert {init.data_type for init in graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    assert all(init.data_type == onnx.TensorProto.FLOAT for init in graph.initializer if len(init.dims) >= 2)
    # no normalisation baked in: the image goes straight into the patch convolution
    first = [n for n in graph.node if "data" in n.input]
    assert [n.op_type for n in first] == ["Conv"]
    assert tiny_model.training  # the caller's module is left as it was


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_onnxruntime_matches_pytorch_for_any_batch(exported: Path, tiny_model, batch: int) -> None:
    encoder = OnnxEncoder(exported)
    x = np.random.default_rng(batch).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)
    got = encoder(x)
    expected = _torch_embed(tiny_model, x)
    assert got.dtype == np.float32 and got.shape == (batch, 512)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(encoder(torch.from_numpy(x)), got)  # tensors are accepted too
    np.testing.assert_allclose(encoder(x.astype(np.float64)), got, atol=1e-6)


def test_official_style_graph_numbered_output_and_other_input_name(tmp_path: Path, tiny_model) -> None:
    path = export_onnx(tiny_model, tmp_path / "official.onnx", output_name=None, batch_size=4)
    encoder = OnnxEncoder(path)
    assert encoder.input_name == "data" and encoder.output_name.isdigit()

    model_proto = onnx.load(str(path))
    old = model_proto.graph.input[0].name
    model_proto.graph.input[0].name = "input.1"
    for node in model_proto.graph.node:
        node.input[:] = ["input.1" if name == old else name for name in node.input]
    renamed = tmp_path / "renamed.onnx"
    onnx.save(model_proto, str(renamed))
    other = OnnxEncoder(renamed)
    assert other.input_name == "input.1"
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    np.testing.assert_allclose(other(x), _torch_embed(tiny_model, x), rtol=0, atol=1e-4)


def test_non_fp32_model_is_exported_as_fp32_copy(tmp_path: Path, tiny_model) -> None:
    model = create_model("lvface_tiny")
    model.load_state_dict(tiny_model.state_dict())
    model = model.to(torch.float64).eval()
    path = export_onnx(model, tmp_path / "from64.onnx")
    assert model.pos_embed.dtype == torch.float64
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    np.testing.assert_allclose(OnnxEncoder(path)(x), _torch_embed(tiny_model, x), rtol=0, atol=1e-4)


def test_encoder_errors_name_the_file_and_the_problem(tmp_path: Path, exported: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ONNX file not found: .*nope.onnx"):
        OnnxEncoder(tmp_path / "nope.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(exported.read_bytes()[:5000])
    with pytest.raises(ValueError, match="broken.onnx: onnxruntime cannot load it"):
        OnnxEncoder(broken)
    encoder = OnnxEncoder(exported)
    with pytest.raises(ValueError, match=r"tiny.onnx: input must have shape \(N, 3, 112, 112\), got \(2, 3, 96, 96\)"):
        encoder(np.zeros((2, 3, 96, 96), np.float32))
    with pytest.raises(ValueError, match=r"got \(3, 112, 112\)"):
        encoder(np.zeros((3, 112, 112), np.float32))
    with pytest.raises(TypeError, match="uint8"):
        encoder(np.zeros((1, 3, 112, 112), np.uint8))
    assert encoder(np.zeros((0, 3, 112, 112), np.float32)).shape == (0, 512)


class _Exploding(torch.nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_failed_export_keeps_the_previous_file(tmp_path: Path, exported: Path, tiny_model) -> None:
    target = tmp_path / "keep.onnx"
    target.write_bytes(exported.read_bytes())
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(_Exploding(tiny_model.config), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx"]  # no partial file left behind
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(tiny_model, tmp_path / "missing" / "x.onnx")
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(tiny_model, target, batch_size=0)
