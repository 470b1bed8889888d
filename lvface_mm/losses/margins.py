"""Additive margins for margin-softmax face recognition losses: CosFace, ArcFace, combined.

A margin is an `nn.Module` that maps cosine logits to scaled logits:

    (cos_logits (B, C) float in [-1, 1], labels (B,) int64) -> s * logits (B, C)

where only the target column of each row changes (`labels[i] = -1` means "this row's class is
not among these columns", as on the ranks that do not own it in a sharded Partial FC; such rows are
only scaled). All non-target logits become `s * cos`.

References:
    - CosFace: Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
    - ArcFace: Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019.
    - The combined form s * (cos(m1 * theta + m2) - m3) is the one of InsightFace's MXNet recipes.

What differs from InsightFace's `arcface_torch` and why:
    - The angular margin is differentiated exactly: d cos(m1*theta + m2) / d cos(theta) =
      m1 * sin(m1*theta + m2) / sin(theta). arcface_torch applies it under `no_grad`, which turns
      the target gradient into a straight-through s * (p - 1). That shortcut is available as
      `straight_through=True`, off by default. It reproduces arcface_torch's gradient everywhere,
      but its values only where theta + m2 <= pi (see the next point and `CombinedMargin`).
    - The combined form is computed as written; arcface_torch ignores m2 whenever m3 > 0.
    - Beyond the angle where m1*theta + m2 reaches pi, cos() would rise again and reward a worse
      sample, so the target logit falls back to the classic linear rule of the original ArcFace code,
      cos(theta) - mm with th = cos(theta_max) and mm = sin(theta_max) * (pi - theta_max), where
      theta_max = (pi - m2) / m1. For plain ArcFace that is th = cos(pi - m), mm = sin(pi - m) * m.
      Like the original, the fallback is not continuous at theta_max. arcface_torch computes those
      constants but no longer uses them: for cos(theta) < cos(pi - m) its target logit is
      s * cos(theta + m) (e.g. -0.878 s at theta = pi, m = 0.5) where this one gives
      s * (cos(theta) - sin(pi - m) * m) (-1.240 s), with or without `straight_through`.
    - The target logit and its derivative are computed in float64 on the (B,) target entries only,
      so acos/sqrt near cos = +-1 lose no precision; the (B, C) work stays in the input dtype.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

# sin(theta) is floored at sqrt(_SIN2_FLOOR) = 1e-6 where it divides, i.e. only at cos = +-1 exactly
# (the nearest float32 cosines below 1 have 1 - cos^2 of about 1.2e-7, far above the floor).
_SIN2_FLOOR = 1e-12


def _check_logits_and_labels(cos_logits: Tensor, labels: Tensor, who: str) -> None:
    if not isinstance(cos_logits, Tensor) or cos_logits.dim() != 2 or not cos_logits.is_floating_point():
        got = f"shape {tuple(cos_logits.shape)} dtype {cos_logits.dtype}" if isinstance(cos_logits, Tensor) else type(
            cos_logits
        ).__name__
        raise ValueError(f"{who}: cos_logits must be a floating-point (B, C) tensor, got {got}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        got = f"shape {tuple(labels.shape)} dtype {labels.dtype}" if isinstance(labels, Tensor) else type(
            labels
        ).__name__
        raise ValueError(f"{who}: labels must be an integer (B,) tensor, got {got}")
    if labels.shape[0] != cos_logits.shape[0]:
        raise ValueError(
            f"{who}: labels has {labels.shape[0]} entries but cos_logits has {cos_logits.shape[0]} rows"
        )
    if labels.device != cos_logits.device:
        raise ValueError(f"{who}: labels are on {labels.device} but cos_logits on {cos_logits.device}")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < -1 or hi >= cos_logits.shape[1]:
            raise ValueError(
                f"{who}: labels must be in [-1, {cos_logits.shape[1]}) (-1 = target not in these columns), "
                f"got values in [{lo}, {hi}]"
            )


class _ReplaceTargetLogits(torch.autograd.Function):
    """out = s * cos, except out[i, y_i] = s * phi(cos[i, y_i]); backward uses the analytic phi'.

    One (B, C) output and nothing (B, C)-sized saved: the gradient is s * grad_out with the target
    entries rescaled by phi'. Autograd through gather/index_put would allocate extra (B, C) buffers.
    """

    @staticmethod
    def forward(ctx, cos: Tensor, rows: Tensor, cols: Tensor, target_fn: Callable, scale: float) -> Tensor:
        target = cos[rows, cols].double()  # (n,) cosines of the rows whose class is in these columns
        phi, dphi = target_fn(target)
        out = cos * scale  # (B, C)
        out[rows, cols] = (phi * scale).to(out.dtype)
        ctx.save_for_backward(rows, cols, dphi.to(cos.dtype))
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None, None]:
        rows, cols, dphi = ctx.saved_tensors
        grad = grad_out * ctx.scale  # (B, C)
        grad[rows, cols] *= dphi
        return grad, None, None, None, None


class Margin(nn.Module):
    """Base class: scale `s` plus a per-target transform `target_fn(cos) -> (phi, dphi/dcos)`."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0 or math.isinf(scale):
            raise ValueError(f"{type(self).__name__}: scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)

    def target_fn(self, cos_target: Tensor) -> tuple[Tensor, Tensor]:
        """Margin-adjusted target cosine phi(cos) and its derivative, element-wise (float64 in and out)."""
        raise NotImplementedError

    def forward(self, cos_logits: Tensor, labels: Tensor) -> Tensor:
        _check_logits_and_labels(cos_logits, labels, type(self).__name__)
        rows = torch.nonzero(labels >= 0).squeeze(1)  # (n,) rows whose target is in these columns
        cols = labels[rows]
        return _ReplaceTargetLogits.apply(cos_logits, rows, cols, self.target_fn, self.scale)


def _check_margin(value: float, name: str, who: str, upper: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < upper:
        raise ValueError(f"{who}: {name} must be a number in [0, {upper:g}), got {value!r}")
    return float(value)


class CosFaceMargin(Margin):
    """s * (cos(theta) - m) on the target: the additive cosine margin (LVFace's default, m = 0.4)."""

    def __init__(self, scale: float = 64.0, margin: float = 0.4) -> None:
        super().__init__(scale)
        self.margin = _check_margin(margin, "margin", "CosFaceMargin", 2.0)

    def target_fn(self, cos_target: Tensor) -> tuple[Tensor, Tensor]:
        return cos_target - self.margin, torch.ones_like(cos_target)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}"


class CombinedMargin(Margin):
    """s * (cos(m1 * theta + m2) - m3) on the target, with exact gradient.

    (1, 0, m) is CosFace, (1, m, 0) ArcFace, (m, 0, 0) a SphereFace-like multiplicative margin.
    Past theta_max = (pi - m2) / m1 the target falls back to cos(theta) - mm - m3 (module docstring).

    `straight_through=True` takes d phi / d cos as 1, as arcface_torch's ArcFace branch (m1 = 1,
    m3 = 0) does. Its values equal arcface_torch's s * cos(theta + m2) only for theta <= pi - m2
    (cos(theta) >= cos(pi - m2)); beyond, this class keeps the monotone fallback cos(theta) - mm
    while arcface_torch keeps cos(theta + m2), which rises again towards -cos(m2) at theta = pi.
    Other arcface_torch differences that `straight_through` does not touch: with m3 > 0 it ignores
    m2, and it does not implement m1 != 1.
    """

    def __init__(
        self,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        *,
        straight_through: bool = False,
    ) -> None:
        super().__init__(scale)
        who = type(self).__name__
        if not isinstance(m1, (int, float)) or isinstance(m1, bool) or not 0.0 < m1 <= 10.0:
            raise ValueError(f"{who}: m1 (multiplicative angular margin) must be in (0, 10], got {m1!r}")
        self.m1 = float(m1)
        self.m2 = _check_margin(m2, "m2 (additive angular margin)", who, math.pi)
        self.m3 = _check_margin(m3, "m3 (additive cosine margin)", who, 2.0)
        self.straight_through = bool(straight_through)
        # Largest angle for which m1*theta + m2 <= pi; beyond it cos() is no longer decreasing.
        self.theta_max = min(math.pi, (math.pi - self.m2) / self.m1)
        self.th = math.cos(self.theta_max)
        self.mm = math.sin(self.theta_max) * (math.pi - self.theta_max)

    def _angular(self, cos_t: Tensor) -> tuple[Tensor, Tensor]:
        cos_t = cos_t.clamp(-1.0, 1.0)
        sin_t = (1.0 - cos_t * cos_t).clamp_min(_SIN2_FLOOR).sqrt()
        if self.m1 == 1.0:
            # cos(theta + m2) without acos: exact to float64 rounding and cheaper.
            phi = cos_t * math.cos(self.m2) - sin_t * math.sin(self.m2)
            dphi = math.cos(self.m2) + cos_t * math.sin(self.m2) / sin_t
        else:
            angle = self.m1 * torch.acos(cos_t) + self.m2
            phi = torch.cos(angle)
            dphi = self.m1 * torch.sin(angle) / sin_t
        return phi, dphi

    def _hard_targets(self, cos_t: Tensor, phi: Tensor, dphi: Tensor) -> tuple[Tensor, Tensor]:
        """Replace phi where the angular margin stops being monotone (theta >= theta_max)."""
        if self.theta_max >= math.pi:
            return phi, dphi
        beyond = cos_t <= self.th
        return torch.where(beyond, cos_t - self.mm, phi), torch.where(beyond, torch.ones_like(dphi), dphi)

    def target_fn(self, cos_target: Tensor) -> tuple[Tensor, Tensor]:
        phi, dphi = self._angular(cos_target)
        phi, dphi = self._hard_targets(cos_target, phi, dphi)
        phi = phi - self.m3
        if self.straight_through:
            dphi = torch.ones_like(dphi)
        return phi, dphi

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m1={self.m1}, m2={self.m2}, m3={self.m3}, straight_through={self.straight_through}"


class ArcFaceMargin(CombinedMargin):
    """s * cos(theta + m) on the target (additive angular margin, m = 0.5 in the MS1M recipes).

    `easy_margin=True` applies the margin only where cos(theta) > 0 (theta < 90 degrees) and leaves
    harder targets at cos(theta); otherwise the classic fallback cos(theta) - sin(pi - m) * m is used
    where theta + m > pi.
    """

    def __init__(
        self, scale: float = 64.0, margin: float = 0.5, easy_margin: bool = False, *, straight_through: bool = False
    ) -> None:
        super().__init__(scale, 1.0, _check_margin(margin, "margin", "ArcFaceMargin", math.pi), 0.0,
                         straight_through=straight_through)
        self.margin = self.m2
        self.easy_margin = bool(easy_margin)

    def _hard_targets(self, cos_t: Tensor, phi: Tensor, dphi: Tensor) -> tuple[Tensor, Tensor]:
        if not self.easy_margin:
            return super()._hard_targets(cos_t, phi, dphi)
        keep = cos_t <= 0.0  # theta >= 90 degrees: no margin at all
        return torch.where(keep, cos_t, phi), torch.where(keep, torch.ones_like(dphi), dphi)

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, margin={self.margin}, easy_margin={self.easy_margin}, "
            f"straight_through={self.straight_through}"
        )


# --- registry ----------------------------------------------------------------------------------

_MARGINS: dict[str, type[Margin]] = {}


def register_margin(name: str) -> Callable[[type[Margin]], type[Margin]]:
    """Class decorator: make a `Margin` subclass available to `create_margin(name, ...)`."""

    def wrap(cls: type[Margin]) -> type[Margin]:
        if name in _MARGINS:
            raise ValueError(f"margin {name!r} is already registered (by {_MARGINS[name].__name__})")
        if not (isinstance(cls, type) and issubclass(cls, Margin)):
            raise TypeError(f"register_margin({name!r}) needs a Margin subclass, got {cls!r}")
        _MARGINS[name] = cls
        return cls

    return wrap


register_margin("cosface")(CosFaceMargin)
register_margin("arcface")(ArcFaceMargin)
register_margin("combined")(CombinedMargin)


def list_margins() -> list[str]:
    return sorted(_MARGINS)


def create_margin(name: str, **kwargs: object) -> Margin:
    """Build a registered margin by name, e.g. `create_margin("arcface", scale=64.0, margin=0.5)`.

    Raises:
        ValueError: unknown name, unknown keyword, or an invalid value.
    """
    cls = _MARGINS.get(name)
    if cls is None:
        close = difflib.get_close_matches(str(name), list(_MARGINS), n=2)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown margin {name!r}{hint} Known margins: {', '.join(list_margins())}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # wrong keyword: name the registry entry and what it accepts
        import inspect

        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(f"create_margin({name!r}): {err}; accepted arguments: {', '.join(params)}") from None


__all__ = [
    "ArcFaceMargin",
    "CombinedMargin",
    "CosFaceMargin",
    "Margin",
    "create_margin",
    "list_margins",
    "register_margin",
]
