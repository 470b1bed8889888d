"""`lvface-mm models` and `lvface-mm export-onnx`, run in-process through the real dispatcher."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from lvface_mm.cli import main
from lvface_mm.models import create_model, get_model_spec
from tests._encoder_fixtures import OFFICIAL, lay_out_hub_cache, official_state_dict


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_models_table_lists_sizes_costs_aliases_and_status(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "hub"
    placeholder = tmp_path / "t.onnx"
    placeholder.write_bytes(b"x")  # status only looks at presence
    lay_out_hub_cache(cache, get_model_spec("lvface_t").weights.onnx_filename, placeholder)

    assert main(["models", "--cache-dir", str(cache)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("lvface_")}
    assert set(lines) == {"lvface_t", "lvface_s", "lvface_b", "lvface_l", "lvface_tiny"}
    for name, facts in OFFICIAL.items():
        assert f"{facts['params'] / 1e6:.2f} M" in lines[name] and f"{facts['gflops']:.2f}" in lines[name]
    assert "vit_b_dp005_mask_005" in lines["lvface_b"]
    assert "not cached  cached" in lines["lvface_t"]  # .pt not cached, .onnx cached
    assert "none        none" in lines["lvface_tiny"]

    assert main(["models", "lvface_?", "--json", "--cache-dir", str(cache)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(OFFICIAL)
    assert rows["lvface_l"]["params"] == OFFICIAL["lvface_l"]["params"]
    assert (rows["lvface_t"]["pt"], rows["lvface_t"]["onnx"], rows["lvface_s"]["onnx"]) == (
        "not cached",
        "cached",
        "not cached",
    )
    assert rows["lvface_b"]["file"] == "LVFace-B_Glint360K/LVFace-B_Glint360K.pt"

    assert main(["models", "resnet*"]) == 2
    assert "no model matches 'resnet*'" in capsys.readouterr().err


def test_export_onnx_from_a_checkpoint_runs_in_onnxruntime(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lvface_mm.models.onnx import OnnxEncoder

    checkpoint = tmp_path / "tiny.pt"
    torch.save(official_state_dict(32, 2, seed=2), checkpoint)
    out = tmp_path / "tiny.onnx"
    rc = main(["export-onnx", "--model", "lvface_tiny", "--checkpoint", str(checkpoint), "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "-> ok" in printed
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    model = create_model("lvface_tiny", checkpoint_path=checkpoint).eval()
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OnnxEncoder(out)(x), expected, rtol=0, atol=1e-4)


def test_export_onnx_random_tiny_and_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "random.onnx"
    assert main(["export-onnx", "--model", "lvface_tiny", "-o", str(out), "--no-verify"]) == 0
    assert "random weights (seed 0)" in capsys.readouterr().err and out.is_file()

    assert main(["export-onnx", "--model", "lvface_tiny", "--checkpoint", str(tmp_path / "no.pt"), "-o", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err

    assert main(["export-onnx", "--model", "lvface_tiny", "-o", str(tmp_path / "no" / "dir" / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err

    assert main(["export-onnx", "--model", "lvfce_t", "-o", str(out)]) == 2
    assert "did you mean" in capsys.readouterr().err

    before = out.read_bytes()
    missing = tmp_path / "t.onnx"
    rc = main(["export-onnx", "--model", "lvface_t", "-o", str(missing), "--cache-dir", str(tmp_path / "empty")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "hf download bytedance-research/LVFace LVFace-T_Glint360K/LVFace-T_Glint360K.pt" in err
    assert not missing.exists() and out.read_bytes() == before
