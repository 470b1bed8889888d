"""Make every registered FaceViT available as `timm.create_model(name)` once lvface_mm is imported.

timm has no plugin entry points, so registration happens when `lvface_mm.models` is imported.
It only adds entries to timm's name table; nothing is built or downloaded.
"""

from __future__ import annotations

from pathlib import Path

from .facevit import FaceViT
from .registry import _MODELS, create_model


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


def register_with_timm() -> None:
    try:
        from timm.models import is_model, register_model
    except ImportError:  # timm is optional for the core encoder
        return
    for name in _MODELS:
        if not is_model(name):
            register_model(_timm_entry(name))
