"""`pretrained=True` end to end without a network: a real Hugging Face cache folder is laid out in
tmp (blob, snapshot at the pinned revision, refs/main) so `hf_hub_download` finds the file; size and
sha256 checks; the one clear message when offline and not cached."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from lvface_mm.models import WeightsNotAvailableError, create_model, fetch_weights, get_model_spec
from lvface_mm.models import pretrained as pretrained_module
from lvface_mm.models.pretrained import (
    HUB_REPO,
    HUB_REVISION,
    WeightsVerificationError,
    cached_weights_path,
    sha256_of,
)
from tests._encoder_fixtures import lay_out_hub_cache, official_state_dict


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever the caller's environment says, these tests must not try the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_records_point_at_the_pinned_release_files() -> None:
    for size in "TSBL":
        weights = get_model_spec(f"lvface_{size.lower()}").weights
        folder = f"LVFace-{size}_Glint360K"
        assert (weights.repo_id, weights.revision) == (HUB_REPO, HUB_REVISION)
        assert weights.filename == f"{folder}/{folder}.pt" and weights.onnx_filename == f"{folder}/{folder}.onnx"
        assert len(weights.onnx_sha256) == 64 and weights.onnx_num_bytes > 70_000_000
        assert weights.preprocessing.mean == weights.preprocessing.std == 127.5
    assert get_model_spec("lvface_tiny").weights is None


def test_pretrained_true_loads_from_the_hub_cache_offline(tmp_path: Path) -> None:
    weights = get_model_spec("lvface_t").weights
    cache = tmp_path / "hub"
    assert cached_weights_path(weights, cache_dir=cache) is None
    state = official_state_dict(256, 12, seed=5)
    payload = tmp_path / "download.pt"
    torch.save(state, payload)
    snapshot = lay_out_hub_cache(cache, weights.filename, payload)
    assert snapshot.is_symlink() and (cache / "models--bytedance-research--LVFace" / "refs" / "main").is_file()

    assert cached_weights_path(weights, cache_dir=cache) == snapshot
    assert cached_weights_path(weights, cache_dir=cache, onnx=True) is None
    model = create_model("lvface_t", pretrained=True, cache_dir=cache)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # the same file through the upstream alias
    assert torch.equal(create_model("vit_t", pretrained=True, cache_dir=cache).pos_embed, state["pos_embed"])


def test_size_and_hash_are_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    payload = tmp_path / "small.pt"
    torch.save(official_state_dict(32, 2), payload)
    b = get_model_spec("lvface_b").weights  # published size and sha256
    lay_out_hub_cache(cache, b.filename, payload)
    with pytest.raises(WeightsVerificationError, match=rf"bytes, expected {b.num_bytes}.*delete it"):
        create_model("lvface_b", pretrained=True, cache_dir=cache)
    assert cached_weights_path(b, cache_dir=cache) is not None  # the bad file is reported, not deleted

    size = payload.stat().st_size
    record = dataclasses.replace(b, filename="custom/small.pt", sha256="0" * 64, num_bytes=size)
    lay_out_hub_cache(cache, record.filename, payload)
    with pytest.raises(WeightsVerificationError, match=rf"sha256 {sha256_of(payload)}, expected 0000"):
        fetch_weights(record, cache_dir=cache)

    calls = []
    monkeypatch.setattr(pretrained_module, "sha256_of", lambda p: calls.append(p) or sha256_of(p))
    good = dataclasses.replace(record, sha256=sha256_of(payload).upper())
    first = fetch_weights(good, cache_dir=cache)
    second = fetch_weights(good, cache_dir=cache)
    assert first == second and first.read_bytes() == payload.read_bytes()
    assert len(calls) == 1  # hashed once per process, not on every load


def test_offline_and_not_cached_says_what_to_fetch_and_where(tmp_path: Path) -> None:
    cache = tmp_path / "empty-cache"
    weights = get_model_spec("lvface_s").weights
    with pytest.raises(WeightsNotAvailableError) as info:
        create_model("lvface_s", pretrained=True, cache_dir=cache)
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message
    assert f"hf download {HUB_REPO} {weights.filename} --revision {HUB_REVISION}" in message
    expected = cache / "models--bytedance-research--LVFace" / "snapshots" / HUB_REVISION / weights.filename
    assert str(expected) in message
    assert "checkpoint_path='/path/to/LVFace-S_Glint360K.pt'" in message

    with pytest.raises(WeightsNotAvailableError, match=r"LVFace-S_Glint360K\.onnx"):
        fetch_weights(weights, cache_dir=cache, onnx=True)
    assert not cache.exists() or not any(cache.rglob("*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lvface_t", "lvface_s", "lvface_b", "lvface_l"])
def test_real_official_weights_agree_with_official_onnx_and_reference(name: str, monkeypatch) -> None:
    """Needs the official files in the Hugging Face cache (`hf download bytedance-research/LVFace ...`)."""
    import numpy as np

    from lvface_mm.models import OnnxEncoder
    from lvface_mm.models.reference import reference_from

    weights = get_model_spec(name).weights
    pt, onnx_file = cached_weights_path(weights), cached_weights_path(weights, onnx=True)
    if pt is None or onnx_file is None:
        pytest.skip(f"{weights.filename} and its .onnx are not cached")
    model = create_model(name, pretrained=True).eval()
    x = torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        ours = model(x)
        ref = reference_from(model)(x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    official = OnnxEncoder(fetch_weights(weights, onnx=True))(x)
    np.testing.assert_allclose(official, ours.numpy(), rtol=0, atol=1e-4 * max(1.0, float(ours.abs().max())))
