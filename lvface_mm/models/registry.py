"""Model registry: names -> (architecture config, pretrained weights record).

`create_model("lvface_b", pretrained=True)` is the one way to build an encoder. Names are the
LVFace release names (`lvface_t/s/b/l`) plus `lvface_tiny` for tests; the upstream factory names
(`vit_t`, `vit_b_dp005_mask_005`, ...) resolve as aliases so nobody has to guess which is which.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, replace
from pathlib import Path

from .facevit import FaceViT, FaceViTConfig
from .pretrained import PretrainedWeights


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: FaceViTConfig
    description: str
    weights: PretrainedWeights | None = None
    # Training-time knobs of the published recipe; inference ignores them.
    recipe_drop_path_rate: float = 0.0
    recipe_mask_ratio: float = 0.0


_MODELS: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register_model(spec: ModelSpec, aliases: tuple[str, ...] = ()) -> ModelSpec:
    if spec.name in _MODELS:
        raise ValueError(f"model {spec.name!r} is already registered")
    _MODELS[spec.name] = spec
    for alias in aliases:
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


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    **overrides: object,
) -> FaceViT:
    """Build a FaceViT by registered name.

    Args:
        name: a name from `list_models()` or an upstream alias such as `vit_b_dp005_mask_005`.
        pretrained: download (or take from the cache) the official weights and load them strictly.
        checkpoint_path: a local checkpoint (.pt/.pth/.bin/.safetensors) to load strictly instead.
        cache_dir: where downloaded weights are cached (default: the Hugging Face cache).
        **overrides: FaceViTConfig fields to change (e.g. `drop_path_rate=0.1`); None values are
            dropped so CLI pass-through works.

    Raises:
        ValueError: unknown name or invalid override; a checkpoint that does not fit this variant.
    """
    spec = get_model_spec(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(FaceViTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"create_model({spec.name!r}): unknown config field(s) {unknown}")
    model = FaceViT(replace(spec.config, **overrides))
    if checkpoint_path is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path, model_name=spec.name)
    elif pretrained:
        if spec.weights is None:
            raise ValueError(
                f"model {spec.name!r} has no official weights; pretrained models: {', '.join(list_models(pretrained=True))}"
            )
        from .checkpoint import load_checkpoint
        from .pretrained import fetch_weights

        load_checkpoint(model, fetch_weights(spec.weights, cache_dir=cache_dir), model_name=spec.name)
    return model


def _variant(embed_dim: int, depth: int) -> FaceViTConfig:
    return FaceViTConfig(embed_dim=embed_dim, depth=depth, num_heads=8, feature_dim=512)


def _register_defaults() -> None:
    from .pretrained import OFFICIAL_WEIGHTS

    register_model(
        ModelSpec("lvface_t", _variant(256, 12), "LVFace-T: 256 wide, 12 deep, 19.14 M params",
                  OFFICIAL_WEIGHTS["lvface_t"], recipe_drop_path_rate=0.1, recipe_mask_ratio=0.1),
        aliases=("vit_t", "vit_t_dp005_mask0"),
    )
    register_model(
        ModelSpec("lvface_s", _variant(512, 12), "LVFace-S: 512 wide, 12 deep, 76.02 M params",
                  OFFICIAL_WEIGHTS["lvface_s"], recipe_drop_path_rate=0.1, recipe_mask_ratio=0.1),
        aliases=("vit_s", "vit_s_dp005_mask_0"),
    )
    register_model(
        ModelSpec("lvface_b", _variant(512, 24), "LVFace-B: 512 wide, 24 deep, 113.83 M params",
                  OFFICIAL_WEIGHTS["lvface_b"], recipe_drop_path_rate=0.05, recipe_mask_ratio=0.1),
        aliases=("vit_b", "vit_b_dp005_mask_005"),
    )
    register_model(
        ModelSpec("lvface_l", _variant(768, 24), "LVFace-L: 768 wide, 24 deep, 255.68 M params",
                  OFFICIAL_WEIGHTS["lvface_l"], recipe_drop_path_rate=0.05, recipe_mask_ratio=0.1),
        aliases=("vit_l", "vit_l_dp005_mask_005"),
    )
    register_model(
        ModelSpec("lvface_tiny", FaceViTConfig(embed_dim=32, depth=2, num_heads=8, feature_dim=512),
                  "random tiny variant for tests and --tiny demos (no weights)"),
    )


_register_defaults()
