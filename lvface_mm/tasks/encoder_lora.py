"""LoRA fine-tuning of a FaceViT encoder with PEFT, for adapting the official weights to a new domain.

Low-rank adapters go on the attention and MLP projections of every block (`attn.qkv`, `attn.proj`,
`mlp.fc1`, `mlp.fc2`); the base weights stay frozen. Paired with a fresh Partial FC head over the
new identities, this trains a few percent of the parameters and saves an adapter of a few MB
(`adapter_model.safetensors` + `adapter_config.json`) that loads on top of the official checkpoint.

The encoder's BatchNorm layers (in the embedding head) should keep the base model's running
statistics while the adapter trains (`FaceRecognitionTask(freeze_norm_stats=True)`): then the base
weights plus the adapter file fully define the fine-tuned model.

The configuration is PEFT's `LoraConfig` itself (or a mapping of its arguments), like every LoRA
in the library (`lvface_mm.lora`).

Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022; PEFT's
custom-model LoRA (`LoraConfig(target_modules=...)` on any `nn.Module`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..lora import lora_config, with_default_targets

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
# What a mapping of LoraConfig arguments starts from: every block's projections, r 8, alpha 16.
# `modules_to_save: [feature]` also trains (and saves) the embedding head.
ENCODER_LORA_DEFAULTS: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": list(DEFAULT_TARGETS)}


def encoder_lora_config(
    config: LoraConfig | Mapping[str, Any] | None = None, where: str = "encoder lora"
) -> LoraConfig:
    """A `peft.LoraConfig` for the encoder: a mapping is read over `ENCODER_LORA_DEFAULTS`; a
    `LoraConfig` without `target_modules` gets `DEFAULT_TARGETS`."""
    if config is None or isinstance(config, Mapping):
        return lora_config({**ENCODER_LORA_DEFAULTS, **(config or {})}, where)
    return with_default_targets(lora_config(config, where), DEFAULT_TARGETS)


def _check_targets(encoder: nn.Module, targets: tuple[str, ...]) -> None:
    linear = [name for name, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        suffixes = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in linear})
        raise ValueError(f"LoRA target(s) {missing} match no Linear layer of the encoder; Linear layers: {suffixes}")


def add_lora(encoder: nn.Module, config: LoraConfig | Mapping[str, Any] | None = None) -> nn.Module:
    """Wrap `encoder` in a PEFT LoRA model: only the adapters (and any `modules_to_save`) train.

    Args:
        encoder: the FaceViT, its base weights already loaded. Modified in place (PEFT swaps the
            target Linears for LoRA layers).
        config: a `peft.LoraConfig` or a mapping of its arguments (see `encoder_lora_config`);
            None = `ENCODER_LORA_DEFAULTS`. `modules_to_save=["feature"]` trains the embedding head.

    Returns the `PeftModel`, which embeds like the encoder: `model(x) -> (B, 512)`.
    """
    from peft import get_peft_model

    lora = encoder_lora_config(config)
    targets = lora.target_modules
    if isinstance(targets, (list, set, tuple)):  # a regex string is PEFT's to match
        _check_targets(encoder, tuple(sorted(targets)))
    return get_peft_model(encoder, lora)


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapter (and a trained embedding head, if any) to `directory`; returns it."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter needs the model returned by add_lora/load_adapter, got {type(model).__name__}")
    directory = Path(directory)
    model.save_pretrained(str(directory))
    return directory


def load_adapter(encoder: nn.Module, directory: str | Path, trainable: bool = False) -> nn.Module:
    """Put a saved adapter on `encoder` (with the base weights it was trained on). Returns the PeftModel."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no LoRA adapter in {directory} (expected adapter_config.json and adapter weights)")
    return PeftModel.from_pretrained(encoder, str(directory), is_trainable=trainable)


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights and return the plain encoder (for export and serving)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"merge_adapter needs a PeftModel, got {type(model).__name__}")
    return model.merge_and_unload()


def unwrap_encoder(model: nn.Module) -> nn.Module:
    """The FaceViT inside a PeftModel (adapters still attached), or `model` itself."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


__all__ = [
    "DEFAULT_TARGETS",
    "ENCODER_LORA_DEFAULTS",
    "add_lora",
    "encoder_lora_config",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
    "unwrap_encoder",
]
