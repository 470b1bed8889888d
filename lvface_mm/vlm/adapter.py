"""IdentityAdapter: the frozen LVFace encoder plus a trainable projector, saved on its own.

`encode(crops)` turns aligned face crops into (N, K, d) identity tokens for one LLM. Only the
projector is trained and saved (`identity_adapter.safetensors` + `identity_adapter_config.json`);
the encoder is named in the config and rebuilt from its own weights, the way LLaVA saves
`mm_projector.bin` alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..models import FaceViT
from .config import IdentityAdapterConfig
from .projectors import FaceFeatures, Projector, ProjectorSpec, create_projector

WEIGHTS_NAME = "identity_adapter.safetensors"


class IdentityAdapter(nn.Module):
    """LVFace encoder (frozen, eval mode) -> projector -> K identity tokens per face.

    Args:
        config: the adapter card.
        encoder: the FaceViT named by `config.encoder` (weights loaded by the caller).
        llm_hidden_size: width of the LLM's token embeddings.
    """

    def __init__(self, config: IdentityAdapterConfig, encoder: FaceViT, llm_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        spec = ProjectorSpec(
            source=config.embedding_source,
            pooled_dim=encoder.feature_dim,
            patch_dim=encoder.embed_dim,
            num_patches=encoder.num_patches,
            out_dim=llm_hidden_size,
            num_tokens=config.num_id_tokens,
            hidden_dim=config.projector_hidden_dim,
        )
        self.projector: Projector = create_projector(config.projector, spec)

    def train(self, mode: bool = True) -> IdentityAdapter:
        # The encoder stays in eval mode: train() would switch on token masking and BatchNorm updates.
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def num_id_tokens(self) -> int:
        return self.config.num_id_tokens

    def features(self, crops: torch.Tensor) -> FaceFeatures:
        """(N, 3, 112, 112) normalised crops -> what the projector reads."""
        param = next(self.encoder.parameters())
        crops = crops.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            tokens = self.encoder.forward_features(crops)  # (N, 144, D)
            pooled = self.encoder.forward_head(tokens, normalize=True)  # (N, 512)
        source = self.config.embedding_source
        return FaceFeatures(
            pooled=pooled if source in ("pooled", "both") else None,
            patches=tokens if source in ("patch", "both") else None,
        )

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, 112, 112) normalised crops -> (N, K, d) identity tokens (gradients flow to the projector)."""
        features = self.features(crops)
        proj_param = next(self.projector.parameters())
        features = FaceFeatures(
            pooled=None if features.pooled is None else features.pooled.to(proj_param.dtype),
            patches=None if features.patches is None else features.patches.to(proj_param.dtype),
        )
        return self.projector(features)

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, 112, 112) -> (N, 512) L2-normalised identity embeddings (for the gallery)."""
        param = next(self.encoder.parameters())
        with torch.no_grad():
            return self.encoder(crops.to(device=param.device, dtype=param.dtype), normalize=True)

    # -- save / load ----------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained part only: projector weights and its calibrated output norm."""
        return {f"projector.{k}": v.detach().contiguous() for k, v in self.projector.state_dict().items()}

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        state = {k: v.to("cpu") for k, v in self.adapter_state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "lvface_mm": "identity_adapter"})
        return directory

    def load_adapter_weights(self, directory: str | os.PathLike[str]) -> None:
        """Load projector weights saved by `save_pretrained` (strict: every key, every shape)."""
        from safetensors.torch import load_file

        path = Path(directory) / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no adapter weights at {path}")
        state = load_file(str(path))
        prefix = "projector."
        stray = sorted(k for k in state if not k.startswith(prefix))
        if stray:
            raise ValueError(f"{path} holds keys outside the projector: {stray[:5]}")
        projector_state = {k[len(prefix) :]: v for k, v in state.items()}
        expected = self.projector.state_dict()
        missing = sorted(set(expected) - set(projector_state))
        unexpected = sorted(set(projector_state) - set(expected))
        shapes = [
            f"{k}: saved {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in projector_state.items()
            if k in expected and v.shape != expected[k].shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{path} does not fit this adapter ({self.config.projector}, K={self.config.num_id_tokens}): "
                f"missing {missing}, unexpected {unexpected}, shape mismatches {shapes}"
            )
        self.projector.load_state_dict(projector_state, strict=True)


__all__ = ["WEIGHTS_NAME", "IdentityAdapter"]
