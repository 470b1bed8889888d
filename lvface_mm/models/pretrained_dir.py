"""Trained encoders on disk in the folder layout of timm and the Hugging Face Hub.

    <dir>/model.safetensors   the FaceViT state dict (official key names), no pickle
    <dir>/config.json         {"architecture": registered name, "num_classes": 0, "num_features": 512,
                               "model_args": architecture fields, "pretrained_cfg": input size and
                               normalisation (models/data_config.py)}

`lvface_mm.models.create_model(dir)` rebuilds the encoder from it, and so does timm, through its
own loaders: `timm.create_model("local-dir:<dir>", pretrained=True)` or, once the folder is
uploaded, `timm.create_model("hf-hub:<user>/<repo>", pretrained=True)` (our names must be
registered with timm first: import `lvface_mm.models` after timm, or call `register_with_timm()`).
Training-only knobs (drop path, token masking, gradient checkpointing) are not saved: a loaded
encoder starts with them off.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic_file import atomic_path
from .checkpoint import load_checkpoint, model_with_fields
from .data_config import facevit_pretrained_cfg
from .facevit import FaceViT, FaceViTConfig
from .registry import get_model_spec, list_models

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# The FaceViTConfig fields that decide the weights' shapes and the forward; the rest only matter in training.
ARCHITECTURE_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "img_size", "patch_size", "in_chans",
                       "feature_dim")


def encoder_config_dict(model: FaceViT, architecture: str | None = None) -> dict[str, Any]:
    """The `config.json` contents for `model` (see the module docstring)."""
    fields = {k: getattr(model.config, k) for k in ARCHITECTURE_FIELDS}
    name = architecture or model.pretrained_cfg.get("architecture") or model_with_fields(fields)
    if name is None:
        raise ValueError(
            "save_pretrained_encoder: this FaceViT's shape matches no registered model; pass architecture= "
            f"with the registered name it was built from (one of {', '.join(list_models())})"
        )
    spec = get_model_spec(name)  # raises a clear error for an unknown name
    cfg = facevit_pretrained_cfg(model.config.img_size, model.config.in_chans)
    cfg.pop("architecture")
    return {
        "architecture": spec.name,
        "num_classes": 0,
        "num_features": model.num_features,
        "model_args": {k: getattr(model.config, k) for k in ARCHITECTURE_FIELDS},
        "pretrained_cfg": cfg,
    }


def save_pretrained_encoder(model: nn.Module, directory: str | os.PathLike, *, architecture: str | None = None) -> Path:
    """Write `model` as `directory/model.safetensors` + `directory/config.json`; returns the folder.

    Args:
        model: a FaceViT (merge a LoRA-wrapped encoder first: `lvface_mm.tasks.merge_adapter`).
        directory: created if missing; existing files of the same names are replaced atomically.
        architecture: the registered name the model was built from; default: the name `create_model`
            recorded in `model.pretrained_cfg`, else the registered variant of the same shape.
    """
    from safetensors.torch import save_file

    if not isinstance(model, FaceViT):
        raise TypeError(
            f"save_pretrained_encoder takes a FaceViT, got {type(model).__name__} "
            "(unwrap DDP/compile and merge LoRA adapters first)"
        )
    config = encoder_config_dict(model, architecture)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; own copies on the CPU.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    # Each file is replaced atomically: an interrupted save never leaves a half-written file behind.
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    with atomic_path(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_encoder_config(directory: str | os.PathLike) -> tuple[str, FaceViTConfig]:
    """(registered name, FaceViTConfig) from `directory/config.json`; ValueError naming the file and field."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a folder written by save_pretrained_encoder")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("architecture"), str):
        raise ValueError(
            f"{path}: needs an \"architecture\" string naming a registered model ({', '.join(list_models())})"
        )
    spec = get_model_spec(raw["architecture"])
    args = raw.get("model_args", {})
    if not isinstance(args, dict):
        raise ValueError(f"{path}: \"model_args\" must be an object of FaceViTConfig fields, got {type(args).__name__}")
    unknown = sorted(set(args) - set(ARCHITECTURE_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown model_args {unknown}; expected some of {list(ARCHITECTURE_FIELDS)}")
    try:
        config = replace(spec.config, **args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: model_args {args} do not make a valid FaceViTConfig: {exc}") from None
    return spec.name, config


def build_from_pretrained_dir(directory: str | os.PathLike, **overrides: object) -> FaceViT:
    """The encoder saved in `directory`, weights loaded strictly (`create_model(directory)` calls this)."""
    name, config = read_encoder_config(directory)
    try:
        config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    except TypeError as exc:
        raise ValueError(f"create_model({os.fspath(directory)!r}): bad override {overrides}: {exc}") from exc
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the folder has a config.json but no weights")
    with torch.device("meta"):  # the weights replace every tensor: skip allocation and random init
        model = FaceViT(config)
    load_checkpoint(model, weights, model_name=name)
    model.pretrained_cfg["architecture"] = name
    return model
