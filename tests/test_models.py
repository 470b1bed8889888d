"""Registry contract tests over every FaceViT variant, parity with the eager upstream forward, and
the inference helpers. Large variants are checked on the meta device (shapes, counts, graph
connectivity) so the suite stays fast; the tiny variant runs for real (T runs in test_checkpoint.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lvface_mm.models import FaceViT, FaceViTConfig, create_model, get_model_spec, list_models
from lvface_mm.models.facevit import DropPath
from lvface_mm.models.inference import cpu_has_native_bf16, prepare_for_inference, resolve_dtype
from lvface_mm.models.reference import ReferenceFaceViT, reference_from
from tests._encoder_fixtures import OFFICIAL, official_state_dict

ALL = list_models()


def _randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics, so eval-mode BN is not an identity in parity tests."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


def test_registry_lists_release_variants_and_tiny() -> None:
    assert {"lvface_t", "lvface_s", "lvface_b", "lvface_l", "lvface_tiny"} <= set(ALL)
    assert list_models("lvface_?") == ["lvface_b", "lvface_l", "lvface_s", "lvface_t"]
    assert "lvface_tiny" not in list_models(pretrained=True)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_release_variants_match_published_sizes_on_meta(name: str) -> None:
    """Counts, FLOPs and output shapes of T/S/B/L, and every parameter wired into the training graph.

    On the meta device nothing is computed: backward only propagates shapes, and a parameter left
    out of the graph keeps `grad is None`.
    """
    facts = OFFICIAL[name]
    with torch.device("meta"):
        model = create_model(name, mask_ratio=0.1, drop_path_rate=0.05).train()
    assert model.config.embed_dim == facts["embed_dim"] and model.config.depth == facts["depth"]
    counted = sum(p.numel() for p in model.parameters())
    assert counted == facts["params"] == model.config.num_params == get_model_spec(name).config.num_params
    assert round(model.flops_per_image() / 1e9, 2) == facts["gflops"]
    tokens = model.forward_features(torch.empty(2, 3, 112, 112, device="meta"))
    assert tokens.shape == (2, 144, facts["embed_dim"])
    out = model.forward_head(tokens)
    assert out.shape == (2, 512)
    out.sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_real_forward_backward_reaches_every_parameter() -> None:
    # The release variants share this code path; their wiring is checked on meta above.
    model = create_model("lvface_tiny", mask_ratio=0.1, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 112, 112)
    out = model(x)
    assert out.shape == (2, 512) and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    # In train mode the second BatchNorm removes any per-batch constant, so the first BN's shift
    # (feature.1.bias) gets a zero gradient up to rounding; every other parameter must move.
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads.pop("feature.1.bias").norm() < 1e-4 * grads["feature.1.weight"].norm()
    assert [n for n, g in grads.items() if g.abs().sum() == 0] == []


def test_tokens_and_normalised_embedding() -> None:
    model = create_model("lvface_tiny").eval()
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        tokens = model.forward_features(x)
        raw = model.forward_head(tokens)
        unit = model(x, normalize=True)
    assert tokens.shape == (3, 144, 32)
    torch.testing.assert_close(unit, F.normalize(raw, dim=-1))
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))  # raw output is not normalised


def test_bottom_right_border_is_never_seen() -> None:
    # 12 patches of 9 px cover rows/cols 0..107; upstream ignores the last 4 (reference/lvface.md §2).
    model = create_model("lvface_tiny").eval()
    x = torch.randn(1, 3, 112, 112)
    y = x.clone()
    y[..., 108:, :] = 5.0
    y[..., :, 108:] = -5.0
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(y), rtol=0, atol=0)
        y[..., 107, 0] += 1.0
        assert not torch.equal(model(x), model(y))


def test_masking_replaces_tokens_with_mask_token_in_train_mode() -> None:
    model = create_model("lvface_tiny", mask_ratio=0.1).train()
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (4, 144, 32)
        is_mask = (tokens == model.mask_token).all(-1)  # (4, 144)
        assert is_mask.sum(1).tolist() == [144 - int(144 * 0.9)] * 4
        assert not torch.equal(is_mask[0], is_mask[1])  # each sample draws its own mask
        model.eval()
        assert not (model.forward_features(x) == model.mask_token).all(-1).any()


def test_drop_path_drops_whole_samples_and_is_identity_in_eval() -> None:
    layer = DropPath(0.5).train()
    x = torch.ones(2000, 4, 3)
    y = layer(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample.min(1).values == per_sample.max(1).values).all()  # the whole sample or nothing
    assert 0.4 < (per_sample[:, 0] == 0).float().mean() < 0.6
    assert torch.equal(layer.eval()(x), x)


def test_grad_checkpointing_equals_plain_with_masking_and_drop_path() -> None:
    plain = create_model("lvface_tiny", mask_ratio=0.1, drop_path_rate=0.2).train()
    ckpt = create_model("lvface_tiny", mask_ratio=0.1, drop_path_rate=0.2, grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 112, 112)
    outs, grads = [], []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        out = model(x)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)


def test_fp32_matches_eager_reference_forward() -> None:
    # LVFace-T from an official-layout file is compared in test_checkpoint.py.
    config = get_model_spec("lvface_tiny").config
    model = FaceViT(config).eval()
    model.load_state_dict(official_state_dict(config.embed_dim, config.depth, seed=1))
    ref = reference_from(model)
    assert isinstance(ref, ReferenceFaceViT) and not ref.training
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.inference_mode():
        ours, theirs = model(x), ref(x)
    assert theirs.abs().max() > 0.1  # a meaningful comparison, not two near-zero vectors
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_bf16_model_accepts_fp32_crops_and_stays_close() -> None:
    model = create_model("lvface_tiny").eval()
    _randomise_batchnorm(model)
    x = torch.randn(4, 3, 112, 112)
    with torch.inference_mode():
        reference = model(x)
        low = create_model("lvface_tiny").eval()
        low.load_state_dict(model.state_dict())
        out = low.to(torch.bfloat16)(x)  # fp32 input is cast to the model's dtype
    assert out.dtype == torch.bfloat16
    assert F.cosine_similarity(out.float(), reference).min() > 0.99


def test_aliases_and_overrides() -> None:
    assert get_model_spec("vit_b_dp005_mask_005").name == "lvface_b"
    assert get_model_spec("vit_t").config == get_model_spec("lvface_t").config
    with torch.device("meta"):
        model = create_model("vit_s_dp005_mask_0", drop_path_rate=0.1, mask_ratio=None)
    assert model.config.drop_path_rate == 0.1 and model.config.mask_ratio == 0.0
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1) and model.blocks[0].drop_path.drop_prob == 0


def test_bad_names_configs_and_inputs_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'lvface_bb'.*lvface_b"):
        create_model("lvface_bb")
    with pytest.raises(ValueError, match="unknown config field"):
        create_model("lvface_tiny", width=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        FaceViTConfig(embed_dim=30, num_heads=8)
    with pytest.raises(ValueError, match="mask_ratio"):
        create_model("lvface_tiny", mask_ratio=1.5)
    with pytest.raises(ValueError, match="has no official weights"):
        create_model("lvface_tiny", pretrained=True)
    model = create_model("lvface_tiny")
    with pytest.raises(ValueError, match=r"\(B, 3, 112, 112\), got \(1, 3, 100, 100\)"):
        model(torch.zeros(1, 3, 100, 100))
    with pytest.raises(ValueError, match=r"got \(1, 1, 112, 112\)"):
        model(torch.zeros(1, 1, 112, 112))
    with pytest.raises(TypeError, match="float crops scaled to \\[-1, 1\\], got torch.uint8"):
        model(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))


def test_timm_create_model() -> None:
    timm = pytest.importorskip("timm")
    from lvface_mm.models import register_with_timm

    assert "lvface_b" in register_with_timm()
    assert {"lvface_t", "lvface_b"} <= set(timm.list_models("lvface_*"))
    with torch.device("meta"):
        model = timm.create_model("lvface_b", drop_path_rate=0.05)
    assert isinstance(model, FaceViT) and model.config.depth == 24 and model.config.drop_path_rate == 0.05
    with pytest.raises(ValueError, match="num_classes"):
        timm.create_model("lvface_tiny", num_classes=10)


def test_prepare_for_inference() -> None:
    model = prepare_for_inference(create_model("lvface_tiny"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32  # fp32 stays the default
    assert resolve_dtype("auto") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_dtype("fp16") == torch.float16 and resolve_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    if not cpu_has_native_bf16():
        with pytest.warns(RuntimeWarning, match="slow fallback"):
            prepare_for_inference(create_model("lvface_tiny"), dtype="bf16")


@pytest.mark.gpu
def test_cuda_paths_follow_the_device_and_match_upstream_autocast() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = create_model("lvface_t").eval()
    _randomise_batchnorm(model)
    ref = reference_from(model).cuda()  # upstream: fp16 autocast around qkv/proj/MLP on CUDA
    fast = prepare_for_inference(model, dtype="auto", device="cuda")
    assert next(fast.parameters()).dtype in (torch.bfloat16, torch.float16)
    x = torch.rand(8, 3, 112, 112, device="cuda") * 2 - 1
    with torch.inference_mode():
        ours, theirs = fast(x), ref(x)
    assert ours.device == x.device
    assert F.cosine_similarity(ours.float(), theirs.float()).min() > 0.995
