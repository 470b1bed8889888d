"""`create_model`: the one way to build an encoder, by registered name or from a saved folder.

Kept apart from the registry (names and specs) and from checkpoint reading, so that the
dependencies run one way: factory -> pretrained_dir / checkpoint -> registry -> facevit.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .facevit import FaceViT, FaceViTConfig
from .pretrained import fetch_weights
from .pretrained_dir import build_from_pretrained_dir
from .registry import get_model_spec, list_models


def create_model(
    name: str | os.PathLike,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    **overrides: object,
) -> FaceViT:
    """Build a FaceViT by registered name, or load one saved by `save_pretrained_encoder`.

    Args:
        name: a name from `list_models()`, an upstream alias such as `vit_b_dp005_mask_005`, or a folder
            holding `config.json` + `model.safetensors` (weights are then always loaded).
        pretrained: download (or take from the cache) the official weights and load them strictly.
        checkpoint_path: a local checkpoint (.pt/.pth/.bin/.safetensors) to load strictly; takes
            precedence over `pretrained`.
        cache_dir: where downloaded weights are cached (default: the Hugging Face cache).
        **overrides: FaceViTConfig fields to change (e.g. `drop_path_rate=0.1`); None values are
            dropped so CLI pass-through works.

    Raises:
        ValueError: unknown name or invalid override; a checkpoint that does not fit this variant.
        WeightsNotAvailableError: `pretrained=True` while offline and the weights are not cached.

    The model is returned in training mode, as any `nn.Module`; call `.eval()` (or
    `prepare_for_inference`) before embedding. Build large variants without memory with
    `with torch.device("meta"): create_model("lvface_l")`.
    """
    saved_dir = isinstance(name, os.PathLike) or (not _is_registered(name) and Path(name).is_dir())
    if saved_dir:
        if checkpoint_path is not None or pretrained:
            raise ValueError(f"create_model({os.fspath(name)!r}): a saved folder brings its own weights; "
                             "drop pretrained= and checkpoint_path=")
        return build_from_pretrained_dir(name, **overrides)
    spec = get_model_spec(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(FaceViTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"create_model({spec.name!r}): unknown config field(s) {unknown}")
    try:
        config = replace(spec.config, **overrides)
    except TypeError as exc:  # a field given a value of the wrong kind that __post_init__ could not compare
        raise ValueError(f"create_model({spec.name!r}): bad override {overrides}: {exc}") from exc
    if checkpoint_path is None and not pretrained:
        model = FaceViT(config)
    else:
        if checkpoint_path is None:
            if spec.weights is None:
                known = ", ".join(list_models(pretrained=True))
                raise ValueError(f"model {spec.name!r} has no official weights; models with weights: {known}")
            checkpoint_path = fetch_weights(spec.weights, cache_dir=cache_dir)
        # Weights are about to be replaced: build without memory or random init (seconds for the
        # large variants), then take the checkpoint's tensors in place of the meta ones.
        with torch.device("meta"):
            model = FaceViT(config)
        load_checkpoint(model, checkpoint_path, model_name=spec.name)
    model.pretrained_cfg["architecture"] = spec.name
    return model


def _is_registered(name: str) -> bool:
    try:
        get_model_spec(name)
    except ValueError:
        return False
    return True
