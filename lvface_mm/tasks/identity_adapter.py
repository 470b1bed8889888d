"""Identity-adapter training task: VLM + identity adapter -> next-token loss on assistant answers.

    loss = CE(answer tokens | prompt with K identity tokens per face)
           [+ preservation_weight * mean(1 - cos(e_lora, e_frozen))   when the encoder has LoRA]

Batches are `lvface_mm.vqa.rendering.RenderedDataset` items (the one prompt format, with the
picture's processor outputs for VLMs): padded ids/labels (labels are -100 outside assistant turns,
so the loss never trains the model to write the user's side), the faces as embedding-table rows or
aligned crops, and which face each placeholder group refers to. Faces go
through the (frozen, or LoRA-tuned) LVFace encoder and the projector; the resulting tokens are
written into the LLM's input embeddings by the bridge's injection hook, inside the model's own
forward, exactly as at inference.

Identity preservation: a captioning loss alone will happily bend the encoder away from what makes
it a good verifier. With LoRA on the encoder, the embedding of the same crop with the adapters
switched off (PEFT's `disable_adapter`, no second copy of the weights) is the anchor, and the
cosine distance to it is penalised.

The task's `state_dict()` holds only what trains (projector, LoRA weights, modules PEFT saves in
full) plus the projector's calibrated norm: checkpoints stay adapter-sized and never contain the
frozen LLM or encoder.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..vlm.injection import IdentityTokens
from ..vlm.matching import bind_references
from ..vlm.projectors import FaceFeatures
from ..vlm.regions import add_region_features
from ..vqa.rendering import model_extras

FaceInput = Literal["embedding", "crop"]


class IdentityAdapterTask(nn.Module):
    """Train the projector (and LoRA on the LLM and/or encoder) of an `IdentityVLM`.

    Args:
        vlm: the `IdentityVLM`, with LoRA already applied where it should train.
        face_input: "embedding" (batches carry precomputed (F, 512) identity embeddings; needs a
            frozen encoder and a pooled projector) or "crop" (batches carry aligned crops).
        encoder_lora: the PEFT-wrapped encoder when the encoder itself is tuned, else None.
        preservation_weight: weight of the identity-preservation term (encoder LoRA only).
    """

    def __init__(
        self,
        vlm: Any,
        face_input: FaceInput = "embedding",
        encoder_lora: nn.Module | None = None,
        preservation_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if face_input not in ("embedding", "crop"):
            raise ValueError(f"face_input must be 'embedding' or 'crop', got {face_input!r}")
        source = vlm.config.embedding_source
        if face_input == "embedding" and (source != "pooled" or encoder_lora is not None):
            raise ValueError(
                f"face_input 'embedding' feeds pooled embeddings to a frozen encoder's projector; this adapter reads "
                f"{source!r}{' and tunes the encoder' if encoder_lora is not None else ''}: use face_input 'crop'"
            )
        if preservation_weight < 0:
            raise ValueError(f"preservation_weight must be >= 0, got {preservation_weight}")
        self.vlm = vlm  # plain object (holds the processor and the injection hook)
        self.model = vlm.model
        self.adapter = vlm.adapter
        self.encoder_lora = encoder_lora
        self.face_input = face_input
        self.preservation_weight = float(preservation_weight)

    # -- adapter-only state ------------------------------------------------------------------------
    def _saved_keys(self) -> set[str]:
        keys = {name for name, p in self.named_parameters() if p.requires_grad}
        keys |= {f"adapter.projector.{name}" for name, _ in self.adapter.projector.named_buffers()}
        return keys

    def state_dict(self, *args: Any, **kwargs: Any) -> OrderedDict[str, Any]:  # type: ignore[override]
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        keep = {prefix + k for k in self._saved_keys()}
        return OrderedDict((k, v) for k, v in full.items() if k in keep)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> _IncompatibleKeys:
        """Load an adapter-only state: every trainable tensor must be present, frozen ones are left alone."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        keep = self._saved_keys()
        missing = sorted(k for k in result.missing_keys if k in keep)
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"adapter state does not fit this task: missing {missing[:8]}, unexpected {unexpected[:8]} "
                "(another stage, LoRA setting or projector?)"
            )
        return _IncompatibleKeys(missing, unexpected)

    def train(self, mode: bool = True) -> IdentityAdapterTask:
        super().train(mode)
        self.adapter.train(mode)  # keeps the encoder in eval mode (no token masking, frozen BatchNorm)
        # A frozen pretrained CNN tower (FastVLM's timm backbone) keeps its running statistics: in
        # train mode BatchNorm would normalise by each small batch's and overwrite them.
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.eval()
        return self

    # -- forward -------------------------------------------------------------------------------------
    def face_tokens(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(N, D) embeddings or (N, 3, 112, 112) crops -> ((N, K, d) identity tokens, (N, D) pooled
        embeddings the projector read (None for patch-only adapters), preservation loss)."""
        projector = self.adapter.projector
        dtype = next(projector.parameters()).dtype
        if self.face_input == "embedding":
            features = FaceFeatures(pooled=F.normalize(faces.to(dtype), dim=-1))
            return projector(features), features.pooled, None
        if self.encoder_lora is None:
            features = self.adapter.features(faces)  # frozen encoder, no graph
        else:
            features, preservation = self._tuned_features(faces)
        features = FaceFeatures(
            pooled=None if features.pooled is None else features.pooled.to(dtype),
            patches=None if features.patches is None else features.patches.to(dtype),
        )
        pooled = None if features.pooled is None else features.pooled.detach()  # the matcher's gate input
        return projector(features), pooled, (preservation if self.encoder_lora is not None else None)

    def _tuned_features(self, crops: torch.Tensor) -> tuple[FaceFeatures, torch.Tensor]:
        encoder = self.encoder_lora
        param = next(self.adapter.encoder.parameters())
        crops = crops.to(device=param.device, dtype=param.dtype)
        tokens = encoder.forward_features(crops)  # (N, 144, D), through the LoRA layers
        pooled = encoder.forward_head(tokens, normalize=True)  # (N, 512)
        with torch.no_grad(), encoder.disable_adapter():
            anchor = encoder(crops, normalize=True)  # (N, 512) the frozen encoder's embedding
        preservation = (1.0 - (pooled.float() * anchor.float()).sum(-1)).mean()
        source = self.adapter.config.embedding_source
        return (
            FaceFeatures(
                pooled=pooled if source in ("pooled", "both") else None,
                patches=tokens if source in ("patch", "both") else None,
            ),
            preservation,
        )

    def _bind(
        self,
        per_row: tuple[torch.Tensor, ...],
        embeddings: torch.Tensor,
        face_mask: torch.Tensor,
        picture_faces: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Open-set rows: bind each reference to the picture face it matches (`vlm.matching`).
        `embeddings` ((N, D)) are the pooled embeddings `face_tokens` already computed."""
        per_row_embeddings = torch.split(embeddings, face_mask.sum(dim=1).tolist())
        projector = self.adapter.projector
        return [
            bind_references(projector, tokens, emb, int(n))
            for tokens, emb, n in zip(per_row, per_row_embeddings, picture_faces.tolist())
        ]

    def _add_regions(
        self,
        per_row: Sequence[torch.Tensor],
        embeddings: torch.Tensor | None,
        face_mask: torch.Tensor,
        batch: dict[str, torch.Tensor],
        pictures: dict[str, torch.Tensor],
    ) -> list[torch.Tensor]:
        """Each row's picture faces (and the references they match) get what is around them in
        the row's picture (`vlm.regions`); the vision tower runs here once more, with gradients."""
        if "pixel_values" not in pictures:
            raise ValueError("region features need the picture: the batch has no pixel_values (a text-only model?)")
        patches = self.vlm.family.picture_patches(self.model, pictures["pixel_values"])  # (B, P, d)
        counts = face_mask.sum(dim=1).tolist()
        per_row_emb = [None] * len(counts) if embeddings is None else torch.split(embeddings, counts)
        return [
            add_region_features(
                self.adapter.projector, tokens, patches[b], batch["face_regions"][b, :n], int(n), per_row_emb[b]
            )
            for b, (tokens, n) in enumerate(zip(per_row, batch["picture_faces"].tolist()))
        ]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        length = int(batch["attention_mask"].sum(dim=1).max())  # trim the dataset-wide padding
        input_ids = batch["input_ids"][:, :length]  # (B, T)
        attention_mask = batch["attention_mask"][:, :length]
        labels = batch["labels"][:, :length]
        face_mask = batch["face_mask"]  # (B, F_max)
        tokens, pooled, preservation = self.face_tokens(batch["faces"][face_mask])  # (N, K, d), (N, D)
        per_row = torch.split(tokens, face_mask.sum(dim=1).tolist())  # B x (F_i, K, d)
        if self.adapter.projector.matcher is not None and "picture_faces" in batch:
            # The card refuses reference matching for patch-only adapters, so `pooled` is there.
            per_row = self._bind(per_row, pooled, face_mask, batch["picture_faces"])
        pictures = model_extras(batch, length)  # pixel_values etc. of VLM samples; {} for text-only
        if self.adapter.projector.region_reader is not None and "face_regions" in batch:
            per_row = self._add_regions(per_row, pooled, face_mask, batch, pictures)
        order = [row[row >= 0].tolist() for row in batch["face_order"]]
        identity = IdentityTokens.from_faces(per_row, order)
        with self.vlm.provide(identity):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **pictures)
        metrics = {"lm_loss": out.loss.detach(), "answer_tokens": (labels != -100).sum().float()}
        loss = out.loss
        if preservation is not None:
            loss = loss + self.preservation_weight * preservation
            metrics["id_preservation"] = preservation.detach()
        return {"loss": loss, **metrics}


__all__ = ["FaceInput", "IdentityAdapterTask"]
