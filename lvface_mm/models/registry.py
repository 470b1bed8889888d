"""Model registry: names -> (architecture config, pretrained weights record).

Building is `lvface_mm.models.create_model` (models/factory.py), which reads this table. The
registry imports neither the factory nor checkpoint loading, so the dependencies run one way:
factory -> checkpoint -> registry -> facevit. Names are the
LVFace release names (`lvface_t/s/b/l`) plus `lvface_tiny` for tests; the upstream factory names
(`vit_t`, `vit_b_dp005_mask_005`, ...) resolve as aliases so nobody has to guess which is which.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

from .facevit import FaceViTConfig
from .pretrained import PretrainedWeights


@dataclass(frozen=True)
class ModelSpec:
    """A registered encoder: its architecture, its official weights (if any) and its other names."""

    name: str
    config: FaceViTConfig
    description: str
    weights: PretrainedWeights | None = None
    # Names the same architecture has elsewhere (upstream `get_model` names); they resolve to `name`.
    aliases: tuple[str, ...] = ()
    # Training-time knobs of the published recipe; inference ignores them.
    recipe_drop_path_rate: float = 0.0
    recipe_mask_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"ModelSpec.name must be an identifier-like string, got {self.name!r}")
        if self.name in self.aliases:
            raise ValueError(f"ModelSpec {self.name!r} lists itself among its aliases")


_MODELS: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add `spec` (and its aliases) to the registry; names must be new."""
    for name in (spec.name, *spec.aliases):
        if name in _MODELS or name in _ALIASES:
            raise ValueError(f"model name {name!r} is already registered")
    _MODELS[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def _resolve(name: str) -> str:
    if name in _MODELS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    close = difflib.get_close_matches(name, list(_MODELS) + list(_ALIASES), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(sorted(_MODELS))}")


def get_model_spec(name: str) -> ModelSpec:
    return _MODELS[_resolve(name)]


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered model names matching a shell-style `pattern`; only those with weights if `pretrained`."""
    names = [n for n in _MODELS if fnmatch.fnmatch(n, pattern)]
    if pretrained:
        names = [n for n in names if _MODELS[n].weights is not None]
    return sorted(names)


def _variant(embed_dim: int, depth: int) -> FaceViTConfig:
    return FaceViTConfig(embed_dim=embed_dim, depth=depth, num_heads=8, feature_dim=512)


def _register_defaults() -> None:
    from .pretrained import OFFICIAL_WEIGHTS

    # Upstream never says which `get_model` name each release used; the file sizes match these
    # architectures (reference/lvface.md §2, §4). The `dp005`/`mask` names differ only in training knobs.
    for name, D, depth, dpr, aliases in (
        ("lvface_t", 256, 12, 0.1, ("vit_t", "vit_t_dp005_mask0")),
        ("lvface_s", 512, 12, 0.1, ("vit_s", "vit_s_dp005_mask_0")),
        ("lvface_b", 512, 24, 0.05, ("vit_b", "vit_b_dp005_mask_005")),
        ("lvface_l", 768, 24, 0.05, ("vit_l_dp005_mask_005",)),
    ):
        config = _variant(D, depth)
        size = name[-1].upper()
        register_model(ModelSpec(
            name, config, f"LVFace-{size} ({D} wide, {depth} deep, {config.num_params / 1e6:.2f} M params)",
            OFFICIAL_WEIGHTS[name], aliases=aliases,
            # upstream masks 10% whenever mask_ratio > 0 (the ratio is not passed through)
            recipe_drop_path_rate=dpr, recipe_mask_ratio=0.1,
        ))
    register_model(ModelSpec(
        "lvface_tiny", FaceViTConfig(embed_dim=32, depth=2, num_heads=8, feature_dim=512),
        "random tiny variant for tests and --tiny demos (no weights)",
    ))


_register_defaults()
