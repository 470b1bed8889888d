"""What an encoder's input must look like: the one record every normaliser reads.

LVFace, like InsightFace's arcface_torch, feeds aligned 112x112 RGB crops scaled to [-1, 1]: in
timm's terms mean 0.5 and std 0.5 per channel on [0, 1] pixels, the whole crop (crop_pct 1.0), and
bilinear resampling (the alignment warp). `FaceViT.pretrained_cfg` is built from this record, so
`timm.data.resolve_model_data_config(model)` returns it; the pipeline (`faces.to_model_input`),
the RecordIO dataset reader and the training task normalise with `normalize_crops`, which reads it.
"""

from __future__ import annotations

from typing import Any

import torch

FACE_CROP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)  # RGB, of pixels in [0, 1]
FACE_CROP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
FACE_CROP_INTERPOLATION = "bilinear"  # cv2.warpAffine's INTER_LINEAR in faces.alignment


def facevit_pretrained_cfg(img_size: int = 112, in_chans: int = 3, architecture: str | None = None) -> dict[str, Any]:
    """timm-style `pretrained_cfg` of a FaceViT: input size, normalisation, crop, no classifier."""
    return {
        "architecture": architecture,
        "input_size": (in_chans, img_size, img_size),
        "fixed_input_size": True,  # the head flattens a fixed token grid
        "interpolation": FACE_CROP_INTERPOLATION,
        "crop_pct": 1.0,  # aligned crops are used whole
        "crop_mode": "center",
        "mean": FACE_CROP_MEAN[:in_chans],
        "std": FACE_CROP_STD[:in_chans],
        "num_classes": 0,  # an embedding model: forward gives num_features (= feature_dim) outputs
        "first_conv": "patch_embed.proj",
        "classifier": None,
        "license": "mit (code); see lvface_mm.models.OFFICIAL_WEIGHTS for the weights' terms",
    }


def normalize_crops(
    images: torch.Tensor,
    mean: tuple[float, ...] = FACE_CROP_MEAN,
    std: tuple[float, ...] = FACE_CROP_STD,
) -> torch.Tensor:
    """(..., C, H, W) uint8 crops -> float32 `(x / 255 - mean) / std` (FaceViT: [-1, 1]).

    Computed as `(x - 255 * mean) / (255 * std)`, which for mean = std = 0.5 is exactly the
    `(x - 127.5) / 127.5` of the reference code, bit for bit.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_crops takes uint8 crops (0-255), got {images.dtype}")
    channels = images.shape[-3] if images.ndim >= 3 else 0
    if channels != len(mean) or channels != len(std):
        raise ValueError(
            f"normalize_crops: images of shape {tuple(images.shape)} need (..., {len(mean)}, H, W) channels-first"
        )
    if len(set(mean)) == 1 and len(set(std)) == 1:  # one scalar per op: no broadcast tensor to build
        return (images.float() - 255.0 * mean[0]) / (255.0 * std[0])
    shift = torch.tensor(mean, device=images.device).mul(255.0).view(-1, 1, 1)  # (C, 1, 1)
    scale = torch.tensor(std, device=images.device).mul(255.0).view(-1, 1, 1)  # (C, 1, 1)
    return (images.float() - shift) / scale
