"""IdentityAdapter: the frozen LVFace encoder plus a trainable projector, saved on its own.

`encode(crops)` turns aligned face crops into (N, K, d) identity tokens for one LLM. Only the
projector is trained and saved (`identity_adapter.safetensors` + `identity_adapter_config.json`
+ a README model card); the encoder is named in the config and rebuilt from its own weights, the
way LLaVA saves `mm_projector.bin` alone. `from_pretrained` and `push_to_hub` take a folder or a
Hugging Face Hub repo id (see `lvface_mm.vlm.hub`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import FaceViT, create_model, get_model_spec
from .config import IdentityAdapterConfig
from .hub import README_NAME, WEIGHTS_NAME, push_folder, resolve_adapter
from .model_card import render_model_card
from .projectors import FaceFeatures, Projector, ProjectorSpec, create_projector

# Written into the weights file's metadata: the projector's output width, so an adapter can be
# rebuilt from its folder alone (the card names the LLM, not its width).
_HIDDEN_SIZE_KEY = "llm_hidden_size"


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
            reference_matching=config.reference_matching,
            region_features=config.region_features,
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
        """The trained part only: projector weights (with its reference matcher) and its calibrated output norm."""
        return {f"projector.{k}": v.detach().contiguous() for k, v in self.projector.state_dict().items()}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *,
        training_data: Mapping[str, Any] | str | None = None,
        evaluation: str | None = None,
        repo_id: str | None = None,
    ) -> Path:
        """Write the card, the projector weights and a README model card into `save_directory`.

        Args:
            save_directory: the folder (created if needed).
            training_data: a short summary of the training data for the model card.
            evaluation: the harness's markdown table for the model card.
            repo_id: the Hub repo the folder is meant for (shown in the card's loading example).
        """
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        state = {k: v.to("cpu") for k, v in self.adapter_state_dict().items()}
        metadata = {"format": "pt", "lvface_mm": "identity_adapter", _HIDDEN_SIZE_KEY: str(self.projector.spec.out_dim)}
        save_file(state, str(directory / WEIGHTS_NAME), metadata=metadata)
        self.write_model_card(directory, training_data=training_data, evaluation=evaluation, repo_id=repo_id)
        return directory

    def write_model_card(
        self,
        directory: str | os.PathLike[str],
        *,
        training_data: Mapping[str, Any] | str | None = None,
        evaluation: str | None = None,
        repo_id: str | None = None,
    ) -> Path:
        """(Re)write README.md for the adapter folder `directory`, describing the files it holds."""
        from .hub import PEFT_CONFIG_NAME, ROWS_NAME

        directory = Path(directory)
        rows = 0
        if (directory / ROWS_NAME).is_file():
            from safetensors import safe_open

            with safe_open(str(directory / ROWS_NAME), "pt") as f:
                rows = int(f.get_slice("input_rows").get_shape()[0])
        text = render_model_card(
            self.config,
            has_lora=(directory / PEFT_CONFIG_NAME).is_file(),
            added_rows=rows,
            training_data=training_data,
            evaluation=evaluation,
            repo_id=repo_id,
        )
        path = directory / README_NAME
        path.write_text(text, encoding="utf-8")
        return path

    def push_to_hub(
        self, repo_id: str, *, token: str | bool | None = None, private: bool | None = None, **kwargs: Any
    ) -> Any:
        """Upload the adapter (what `save_pretrained` writes) to the Hub repo `repo_id` in one commit.

        `kwargs` go to `lvface_mm.vlm.hub.push_folder` (`revision`, `commit_message`, `create_pr`).
        """
        return push_folder(
            lambda d: self.save_pretrained(d, repo_id=repo_id), repo_id, token=token, private=private, **kwargs
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike[str],
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool | None = None,
        encoder: FaceViT | None = None,
        encoder_checkpoint: str | os.PathLike[str] | None = None,
        encoder_pretrained: bool | None = None,
        llm_hidden_size: int | None = None,
    ) -> IdentityAdapter:
        """Rebuild a saved adapter (encoder + trained projector) from a folder or a Hub repo id.

        Args:
            path_or_repo_id: a folder written by `save_pretrained`, or "user/repo" on the Hub.
            revision, token, cache_dir, local_files_only: see `lvface_mm.vlm.hub.resolve_adapter`.
            encoder: an already built FaceViT (else built from the card's encoder name).
            encoder_checkpoint, encoder_pretrained: see `build_encoder`.
            llm_hidden_size: the projector's output width (None: read from the weights file).

        The LLM's LoRA beside the projector is loaded by `IdentityVLM.from_pretrained(model, adapter=...)`.
        """
        folder = resolve_adapter(
            path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
        )
        config = IdentityAdapterConfig.from_pretrained(folder)
        hidden = llm_hidden_size if llm_hidden_size is not None else saved_hidden_size(folder)
        face_vit = (
            encoder if encoder is not None else build_encoder(config.encoder, encoder_checkpoint, encoder_pretrained)
        )
        adapter = cls(config, face_vit, hidden)
        adapter.load_adapter_weights(folder)
        return adapter

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


def saved_hidden_size(directory: str | os.PathLike[str]) -> int:
    """The LLM width a saved projector was built for, from its weights file's metadata."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no adapter weights at {path}")
    with safe_open(str(path), "pt") as f:
        value = (f.metadata() or {}).get(_HIDDEN_SIZE_KEY)
    if value is None:
        raise ValueError(f"{path} does not record the LLM width it was built for; pass llm_hidden_size=")
    return int(value)


def build_encoder(
    name: str, checkpoint: str | os.PathLike[str] | None = None, pretrained: bool | None = None
) -> FaceViT:
    """The LVFace encoder `name`: from a local checkpoint, the official weights, or seeded random.

    Args:
        name: encoder name from `lvface_mm.list_models()`.
        checkpoint: a local checkpoint to load instead of the official weights.
        pretrained: load the official weights; None = yes when they exist.
    """
    if checkpoint is not None:
        return create_model(name, checkpoint_path=checkpoint)
    if pretrained is None:
        pretrained = get_model_spec(name).weights is not None
    if pretrained:
        return create_model(name, pretrained=True)
    # A random encoder (tests, tiny demos, benchmarks) is seeded, so a saved adapter reloads against
    # the very encoder it was trained with.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model(name)


__all__ = ["WEIGHTS_NAME", "IdentityAdapter", "build_encoder", "saved_hidden_size"]
