"""Projectors: shapes, output norm, sources, registry errors, gradients."""

from __future__ import annotations

import pytest
import torch

from lvface_mm.vlm import FaceFeatures, ProjectorSpec, create_projector, list_projectors

N, P, D, OUT, K = 3, 144, 32, 48, 4
CASES = [
    ("linear", "pooled"),
    ("linear", "patch"),
    ("mlp2x_gelu", "pooled"),
    ("mlp2x_gelu", "patch"),
    ("resampler", "patch"),
    ("resampler", "both"),
]


def features(source: str, seed: int = 0) -> FaceFeatures:
    g = torch.Generator().manual_seed(seed)
    pooled = torch.nn.functional.normalize(torch.randn(N, 512, generator=g), dim=-1)
    patches = torch.randn(N, P, D, generator=g)
    return FaceFeatures(
        pooled=pooled if source in ("pooled", "both") else None,
        patches=patches if source in ("patch", "both") else None,
    )


def spec(source: str, **changes) -> ProjectorSpec:
    fields = dict(source=source, pooled_dim=512, patch_dim=D, num_patches=P, out_dim=OUT, num_tokens=K, hidden_dim=64)
    fields.update(changes)
    return ProjectorSpec(**fields)


def test_registry_lists_the_three_designs() -> None:
    assert list_projectors() == ["linear", "mlp2x_gelu", "resampler"]


@pytest.mark.parametrize(("name", "source"), CASES)
def test_tokens_have_shape_and_calibrated_norm(name: str, source: str) -> None:
    torch.manual_seed(0)
    projector = create_projector(name, spec(source))
    projector.calibrate(0.37)
    x = features(source)
    out = projector(x)
    assert out.shape == (N, K, OUT)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((N, K), 0.37), rtol=1e-5, atol=1e-6)
    # Different faces give different tokens, and each face's K tokens differ from each other.
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[0, 0], out[0, 1])
    # The norm is a saved buffer, so a reloaded adapter keeps its scale.
    assert float(projector.state_dict()["output_norm"]) == pytest.approx(0.37)
    out.sum().backward()
    assert all(p.grad is not None for p in projector.parameters())


def test_resampler_with_both_reads_the_pooled_embedding() -> None:
    torch.manual_seed(0)
    projector = create_projector("resampler", spec("both"))
    x = features("both")
    changed = FaceFeatures(pooled=x.pooled.roll(1, dims=0), patches=x.patches)
    assert not torch.allclose(projector(x), projector(changed))


@pytest.mark.parametrize(
    ("name", "source", "message"),
    [
        ("resampler", "pooled", r"ResamplerProjector reads \('patch', 'both'\)"),
        ("linear", "both", r"LinearProjector reads \('pooled', 'patch'\)"),
        ("perceiver", "patch", "unknown projector 'perceiver'"),
    ],
)
def test_bad_projector_choices_raise(name: str, source: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_projector(name, spec(source))


def test_wrong_feature_shapes_raise() -> None:
    projector = create_projector("mlp2x_gelu", spec("pooled"))
    with pytest.raises(ValueError, match=r"expects pooled embeddings \(N, 512\), got \(3, 256\)"):
        projector(FaceFeatures(pooled=torch.randn(3, 256)))
    patch_projector = create_projector("linear", spec("patch"))
    with pytest.raises(ValueError, match=r"expects patch tokens \(N, 144, 32\), got None"):
        patch_projector(FaceFeatures(pooled=torch.randn(3, 512)))
    with pytest.raises(ValueError, match="output norm must be > 0"):
        projector.calibrate(0.0)
    with pytest.raises(ValueError, match="cannot make 200 tokens from 144 patch tokens"):
        spec("patch", num_tokens=200)
