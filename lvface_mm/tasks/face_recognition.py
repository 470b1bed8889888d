"""Face-recognition training task: encoder + margin head -> loss, for the generic training loop.

A task is an `nn.Module` whose `forward(batch)` returns a dict with a scalar "loss" and any other
scalars worth logging. This one embeds aligned crops with a FaceViT (or a LoRA-wrapped FaceViT)
and scores the embeddings with a sharded Partial FC head or LVFace's PCO head.

What the loop learns from the task, besides `forward`:
    - `sharded_modules()`: the head holds a different slice of the class centres on every rank, so
      the loop keeps it out of DDP, does not clip its gradients, and checkpoints it through its
      world-size independent `full_state_dict()`;
    - `set_data_parallel(wrap)`: on several processes the loop hands over its DDP constructor; only
      the encoder is wrapped (and called through the wrapper), the head stays a plain module;
    - `after_optimizer_step(step, epoch, metrics)`: a PCO head applies the feature-expectation bank
      update accumulated over the step's micro-batches (one update per optimizer step, whatever the
      accumulation), then the PCO stage scheduler sees the batch mean of
      cos^2(feature, own centre) after every optimizer step and moves the head to stage 2 or 3;
      its state travels in the task's `state_dict()` (`_extra_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..losses import CosineStageScheduler, PartialFC, PCOHead
from ..models.data_config import normalize_crops


def images_to_input(images: Tensor) -> Tensor:
    """(B, 3, 112, 112) uint8 RGB crops -> float in [-1, 1], as `faces.alignment.to_model_input`.

    Float input is taken as already normalised. Normalising here, on the training device, lets
    loaders ship uint8 (4x less host-to-device traffic).
    """
    if images.dtype == torch.uint8:
        return normalize_crops(images)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 crops or float in [-1, 1], got dtype {images.dtype}")
    return images


class FaceRecognitionTask(nn.Module):
    """Encoder + Partial FC / PCO head.

    Args:
        encoder: maps (B, 3, 112, 112) in [-1, 1] to (B, D) embeddings (FaceViT or a PEFT wrapper).
        head: `PartialFC` or `PCOHead` over the training identities.
        stage_scheduler: switches a PCO head's stage from its cos^2 signal; None keeps the stage.
        freeze_norm_stats: keep the encoder's BatchNorm layers in eval mode while training (LoRA
            fine-tuning: the base model's statistics stay valid for the saved adapter).

    `forward((images, labels, ...))` returns {"loss", "cos_sq_mean", "stage"} (0-dim tensors).
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: PartialFC,
        stage_scheduler: CosineStageScheduler | None = None,
        freeze_norm_stats: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(head, PartialFC):
            raise TypeError(f"head must be a lvface_mm.losses PartialFC or PCOHead, got {type(head).__name__}")
        if stage_scheduler is not None and not isinstance(head, PCOHead):
            raise ValueError("a stage scheduler needs a PCOHead; plain Partial FC has a single stage")
        self.encoder = encoder
        self.head = head
        if isinstance(head, PCOHead):
            # The bank is updated once per optimizer step from all its micro-batches (after_optimizer_step).
            head.defer_bank_update = True
        self.stage_scheduler = stage_scheduler
        self.freeze_norm_stats = freeze_norm_stats
        # The DDP-wrapped encoder while the loop runs on several processes. A plain dict, so the
        # wrapper is not registered as a submodule (no second copy of the keys in state_dict()).
        self._parallel: dict[str, nn.Module] = {}

    def train(self, mode: bool = True) -> FaceRecognitionTask:
        super().train(mode)
        if mode and self.freeze_norm_stats:
            for module in self.encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, 112, 112) uint8 or [-1, 1] crops -> (B, D) raw embeddings."""
        encoder = self._parallel.get("encoder", self.encoder)
        return encoder(images_to_input(images))

    def forward(self, batch: tuple[Tensor, ...] | list[Tensor]) -> dict[str, Tensor]:
        images, labels = batch[0], batch[1]
        embeddings = self.embed(images)  # (B, D)
        out = self.head(embeddings, labels)
        stage = out.stage if out.stage is not None else 1
        return {
            "loss": out.loss,
            "cos_sq_mean": out.cos_sq_mean.detach(),
            "stage": torch.tensor(float(stage), device=out.loss.device),
        }

    # -- what the training loop asks of a task ------------------------------------------------------
    def sharded_modules(self) -> dict[str, nn.Module]:
        """Submodules whose parameters are split by rows across ranks (kept out of DDP)."""
        return {"head": self.head}

    def set_data_parallel(self, wrap: Callable[[nn.Module], nn.Module] | None) -> None:
        """Route the encoder through `wrap(encoder)` (e.g. DDP) from now on; None goes back to the plain
        encoder (and releases the wrapper). The head is never wrapped: its rows differ per rank."""
        self._parallel = {} if wrap is None else {"encoder": wrap(self.encoder)}

    def after_optimizer_step(self, step: int, epoch: int, metrics: dict[str, float]) -> dict[str, float]:
        """Commit the step's PCO bank update, then advance the PCO stage from this step's cos^2 mean
        (identical on every rank). Collective."""
        if isinstance(self.head, PCOHead):
            self.head.commit_bank_update()  # before a switch to stage 3 freezes the bank
        if self.stage_scheduler is None:
            return {}
        stage = self.stage_scheduler.update(metrics.get("cos_sq_mean"), step, epoch=epoch)
        if stage != self.head.stage:
            self.head.stage = stage  # entering stage 2 seeds the feature-expectation bank
        return {"stage": float(stage)}

    def get_extra_state(self) -> dict[str, Any]:
        return {"stage_scheduler": self.stage_scheduler.state_dict() if self.stage_scheduler else None}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("stage_scheduler") if isinstance(state, dict) else None
        if self.stage_scheduler is not None and saved is not None:
            self.stage_scheduler.load_state_dict(saved)


__all__ = ["FaceRecognitionTask", "images_to_input"]
