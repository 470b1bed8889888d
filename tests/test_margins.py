"""Margins: values and gradients against the definitions written with torch.acos/cos and autograd."""

from __future__ import annotations

import math

import pytest
import torch
from _losses_fixtures import direct_margin

from lvface_mm.losses import ArcFaceMargin, CombinedMargin, CosFaceMargin, create_margin, list_margins


def _cosines(rows: int = 64, cols: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    cos = torch.empty(rows, cols, dtype=torch.float64).uniform_(-0.995, 0.995)
    labels = torch.randint(0, cols, (rows,))
    labels[::7] = -1  # rows whose class lives in other columns (another rank)
    return cos, labels


def _compare(head: torch.nn.Module, kind: str, cos: torch.Tensor, labels: torch.Tensor, **kw: float) -> None:
    mine = cos.clone().requires_grad_()
    ref = cos.clone().requires_grad_()
    out = head(mine, labels)
    expected = direct_margin(ref, labels, kind, head.scale, **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    upstream = torch.randn_like(cos)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-9, atol=1e-9)


def test_cosface_matches_definition() -> None:
    cos, labels = _cosines()
    _compare(CosFaceMargin(scale=64.0, margin=0.4), "cosface", cos, labels, margin=0.4)


@pytest.mark.parametrize("margin", [0.5, 1.2])
def test_arcface_matches_acos_autograd_including_theta_plus_m_beyond_pi(margin: float) -> None:
    cos, labels = _cosines(rows=256)
    target = cos[torch.arange(256)[labels >= 0], labels[labels >= 0]]
    # the test must exercise both branches: theta + m <= pi and theta + m > pi
    assert (target < math.cos(math.pi - margin)).sum() >= 5 and (target > math.cos(math.pi - margin)).sum() >= 5
    _compare(ArcFaceMargin(scale=64.0, margin=margin), "arcface", cos, labels, margin=margin)


def test_arcface_easy_margin_matches_definition() -> None:
    cos, labels = _cosines(rows=128)
    _compare(ArcFaceMargin(32.0, 0.5, easy_margin=True), "arcface", cos, labels, margin=0.5, easy_margin=True)


@pytest.mark.parametrize(("m1", "m2", "m3"), [(1.0, 0.3, 0.2), (1.35, 0.0, 0.0), (0.9, 0.4, 0.15), (2.0, 0.1, 0.0)])
def test_combined_matches_definition(m1: float, m2: float, m3: float) -> None:
    cos, labels = _cosines(rows=256)
    _compare(CombinedMargin(64.0, m1, m2, m3), "combined", cos, labels, m1=m1, m2=m2, m3=m3)


def test_arcface_gradient_is_exact_and_straight_through_is_opt_in() -> None:
    cos = torch.tensor([[0.3, 0.1]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0])
    ArcFaceMargin(64.0, 0.5)(cos, labels)[0, 0].backward()
    theta = math.acos(0.3)
    assert cos.grad[0, 0].item() == pytest.approx(64.0 * math.sin(theta + 0.5) / math.sin(theta), rel=1e-12)
    assert cos.grad[0, 1].item() == 0.0
    cos.grad = None
    ArcFaceMargin(64.0, 0.5, straight_through=True)(cos, labels)[0, 0].backward()
    assert cos.grad[0, 0].item() == pytest.approx(64.0, rel=1e-12)


def test_combined_reduces_to_cosface_and_arcface() -> None:
    cos, labels = _cosines()
    torch.testing.assert_close(CombinedMargin(64.0, 1.0, 0.0, 0.4)(cos, labels), CosFaceMargin(64.0, 0.4)(cos, labels))
    torch.testing.assert_close(CombinedMargin(64.0, 1.0, 0.5, 0.0)(cos, labels), ArcFaceMargin(64.0, 0.5)(cos, labels))


def test_fp32_gradient_finite_at_cos_plus_minus_one() -> None:
    cos = torch.tensor([[1.0, 0.2], [-1.0, 0.2], [0.2, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    for margin in (ArcFaceMargin(), CombinedMargin(64.0, 1.5, 0.2, 0.1)):
        out = margin(cos, labels)
        (grad,) = torch.autograd.grad(out.sum(), cos)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    # cos(0 + 0.5) at cos = 1, the linear fallback at cos = -1
    out = ArcFaceMargin(1.0, 0.5)(cos.detach(), labels)
    assert out[0, 0].item() == pytest.approx(math.cos(0.5), abs=1e-6)
    assert out[1, 0].item() == pytest.approx(-1.0 - math.sin(0.5) * 0.5, abs=1e-6)


def test_rows_without_target_are_only_scaled() -> None:
    cos = torch.rand(4, 5) * 2 - 1
    out = ArcFaceMargin(10.0, 0.5)(cos, torch.full((4,), -1))
    torch.testing.assert_close(out, cos * 10.0)


def test_registry_and_errors() -> None:
    assert {"cosface", "arcface", "combined"} <= set(list_margins())
    margin = create_margin("arcface", scale=32.0, margin=0.3)
    assert isinstance(margin, ArcFaceMargin) and margin.scale == 32.0 and margin.margin == 0.3
    with pytest.raises(ValueError, match="unknown margin 'arcfce'.*did you mean 'arcface'"):
        create_margin("arcfce")
    with pytest.raises(ValueError, match="accepted arguments: scale, margin"):
        create_margin("cosface", m=0.4)
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0, got -1"):
        CosFaceMargin(scale=-1)
    with pytest.raises(ValueError, match=r"margin must be a number in \[0, 3.14159\), got 4"):
        ArcFaceMargin(margin=4)
    with pytest.raises(ValueError, match=r"m1 .* must be in \(0, 10\], got 0"):
        CombinedMargin(m1=0)


def test_input_errors_name_the_problem() -> None:
    margin = CosFaceMargin()
    with pytest.raises(ValueError, match=r"cos_logits must be a floating-point \(B, C\) tensor, got shape \(5,\)"):
        margin(torch.zeros(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[-1, 3\).*got values in \[0, 3\]"):
        margin(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels has 3 entries but cos_logits has 2 rows"):
        margin(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels must be an integer"):
        margin(torch.zeros(2, 3), torch.zeros(2))


def _arcface_torch_logits(cos: torch.Tensor, labels: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """arcface_torch's ArcFace branch as described in the reference notes: angles, + m on the target,
    back to cosines, all under no_grad (so autograd sees only the final * s); no theta + m > pi rule."""
    logits = cos.clone()
    rows = torch.nonzero(labels >= 0).squeeze(1)
    with torch.no_grad():
        logits.arccos_()
        logits[rows, labels[rows]] += margin
        logits.cos_()
    return logits * scale


def test_straight_through_equals_arcface_torch_only_where_theta_plus_m_within_pi() -> None:
    scale, margin = 64.0, 0.5
    cos, labels = _cosines(rows=256)
    rows = torch.nonzero(labels >= 0).squeeze(1)
    mine = ArcFaceMargin(scale, margin, straight_through=True)(cos.clone().requires_grad_(), labels)
    theirs = _arcface_torch_logits(cos, labels, scale, margin)
    target = cos[rows, labels[rows]]
    beyond = target < math.cos(math.pi - margin)  # theta + m > pi
    assert beyond.sum() >= 5 and (~beyond).sum() >= 5
    # Non-target logits, and target logits with theta + m <= pi: the same values.
    off_target = torch.ones_like(cos, dtype=torch.bool)
    off_target[rows, labels[rows]] = False
    torch.testing.assert_close(mine[off_target], theirs[off_target], rtol=0, atol=1e-9)
    mine_t, theirs_t = mine[rows, labels[rows]], theirs[rows, labels[rows]]
    torch.testing.assert_close(mine_t[~beyond], theirs_t[~beyond], rtol=0, atol=1e-9)
    # theta + m > pi: the documented difference. Here s * (cos - sin(pi - m) * m) against s * cos(theta + m).
    mm = math.sin(math.pi - margin) * margin
    torch.testing.assert_close(mine_t[beyond], scale * (target[beyond] - mm), rtol=0, atol=1e-9)
    torch.testing.assert_close(theirs_t[beyond], scale * torch.cos(torch.acos(target[beyond]) + margin),
                               rtol=0, atol=1e-9)
    assert (theirs_t[beyond] - mine_t[beyond]).min().item() > 0  # arcface_torch's target is too easy there
    # The worked example of the docs: theta = pi.
    at_pi = ArcFaceMargin(1.0, margin, straight_through=True)(torch.tensor([[-1.0]], dtype=torch.float64),
                                                              torch.tensor([0]))
    assert at_pi.item() == pytest.approx(-1.240, abs=1e-3)
    assert math.cos(math.pi + margin) == pytest.approx(-0.878, abs=1e-3)
    # Gradients: both straight-through (s on every column), wherever theta is.
    cos_grad = cos.clone().requires_grad_()
    upstream = torch.randn_like(cos)
    (ArcFaceMargin(scale, margin, straight_through=True)(cos_grad, labels) * upstream).sum().backward()
    ref = cos.clone().requires_grad_()
    (_arcface_torch_logits(ref, labels, scale, margin) * upstream).sum().backward()
    torch.testing.assert_close(cos_grad.grad, ref.grad, rtol=1e-12, atol=1e-12)
