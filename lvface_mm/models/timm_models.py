"""Make every registered FaceViT available as `timm.create_model(name)`.

timm has no plugin entry points, so our names enter timm's table either when `lvface_mm.models` is
imported after timm, or when `register_with_timm()` is called. Importing timm costs several seconds
(it imports every timm architecture), so `import lvface_mm` never imports it just to register.
Registration only adds names; nothing is built or downloaded.

Saved encoders (`save_pretrained_encoder`) load through timm's own sources too:
`timm.create_model("local-dir:<folder>", pretrained=True)` and `"hf-hub:<user>/<repo>"`. timm reads
the folder's `config.json`, calls our entry with its `model_args` and a `pretrained_cfg` naming the
source, and the entry loads `model.safetensors` from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .facevit import FaceViT
from .factory import create_model
from .pretrained_dir import WEIGHTS_NAME
from .registry import list_models


def _as_dict(cfg: object) -> dict[str, Any]:
    if isinstance(cfg, dict):
        return dict(cfg)
    to_dict = getattr(cfg, "to_dict", None)  # timm's PretrainedCfg dataclass
    return dict(to_dict()) if callable(to_dict) else {}


def _saved_weights(cfg: dict[str, Any], cache_dir: str | Path | None) -> Path | None:
    """The `model.safetensors` a timm `local-dir:` / `hf-hub:` source points at, or None for our registry names."""
    if cfg.get("source") == "local-dir":
        return Path(cfg["file"]) / WEIGHTS_NAME
    if cfg.get("source") == "hf-hub":
        from huggingface_hub import hf_hub_download

        repo, _, revision = str(cfg["hf_hub_id"]).partition("@")
        return Path(hf_hub_download(repo, WEIGHTS_NAME, revision=revision or None, cache_dir=cache_dir))
    return None


def _timm_entry(name: str):
    def build(pretrained: bool = False, checkpoint_path: str | Path | None = None, **kwargs: object) -> FaceViT:
        # timm passes generic kwargs; FaceViT has no classifier and its preprocessing is fixed.
        cfg = _as_dict(kwargs.pop("pretrained_cfg", None))
        cache_dir = kwargs.pop("cache_dir", None)
        for generic in ("pretrained_cfg_overlay", "features_only", "pretrained_model_args"):
            kwargs.pop(generic, None)
        num_classes = kwargs.pop("num_classes", None)
        if num_classes not in (None, 0):
            raise ValueError(f"{name} is an embedding model (feature_dim outputs); num_classes={num_classes} "
                             "is not supported, use lvface_mm.losses for classification heads")
        saved = _saved_weights(cfg, cache_dir) if pretrained and checkpoint_path is None else None
        if saved is not None:
            checkpoint_path, pretrained = saved, False
        return create_model(name, pretrained=pretrained, checkpoint_path=checkpoint_path, cache_dir=cache_dir,
                            **kwargs)

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
