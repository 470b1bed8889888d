"""Make every registered FaceViT available as `timm.create_model(name)`.

timm has no plugin entry points, so our names enter timm's table either when `lvface_mm.models` is
imported after timm, or when `register_with_timm()` is called. Importing timm costs several seconds
(it imports every timm architecture), so `import lvface_mm` never imports it just to register.
Registration only adds names; nothing is built or downloaded.
"""

from __future__ import annotations

from pathlib import Path

from .facevit import FaceViT
from .registry import create_model, list_models


def _timm_entry(name: str):
    def build(pretrained: bool = False, checkpoint_path: str | Path | None = None, **kwargs: object) -> FaceViT:
        # timm passes generic kwargs (pretrained_cfg, num_classes, ...); FaceViT has no classifier.
        for generic in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
            kwargs.pop(generic, None)
        num_classes = kwargs.pop("num_classes", None)
        if num_classes not in (None, 0):
            raise ValueError(f"{name} is an embedding model (feature_dim outputs); num_classes={num_classes} "
                             "is not supported, use lvface_mm.losses for classification heads")
        return create_model(name, pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)

    build.__name__ = name
    build.__module__ = __name__
    return build


def register_with_timm() -> list[str]:
    """Register every lvface_mm model with timm (idempotent). Returns the names timm now knows."""
    try:
        from timm.models import is_model, register_model
    except ImportError as exc:
        raise ImportError("register_with_timm needs timm: pip install timm") from exc
    for name in list_models():
        if not is_model(name):
            register_model(_timm_entry(name))
    return list_models()
